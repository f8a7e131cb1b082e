"""A wheel built from the tree runs outside the checkout: templates, migrations and the demo's
examples ship inside the package.

The wheel goes into a fresh virtualenv that cannot see the checkout; the dependencies come
from this test's own environment, whose site-packages directory is added by a ``.pth`` file
(a plain path: the editable install's finder there is not loaded, so ``mailer`` resolves to
the wheel's copy).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
# Everything the build reads: pyproject.toml names README.md as the long description.
SOURCES = ("pyproject.toml", "README.md", "mailer")


def run(*args: str | Path, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """Run a command to its end; a failure shows its output."""
    done = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"{args}: {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built offline with this environment's setuptools from a copy of the tree
    (a build in place would leave build/ and *.egg-info/ in the checkout)."""
    base = tmp_path_factory.mktemp("wheel")
    source = base / "source"
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            source.mkdir(exist_ok=True)
            shutil.copy2(path, source / name)
    dist = base / "dist"
    run(
        sys.executable,
        *("-m", "pip", "wheel", "--quiet", "--no-index", "--no-deps", "--no-build-isolation"),
        *("--wheel-dir", dist, source),
        cwd=base,
    )
    (built,) = dist.glob("mailer-*.whl")
    return built


@pytest.fixture(scope="module")
def venv(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtualenv with the wheel installed; its bin directory."""
    home = tmp_path_factory.mktemp("venv")
    run(sys.executable, "-m", "venv", "--without-pip", home, cwd=home)
    python = home / "bin" / "python"
    run(
        sys.executable,
        *("-m", "pip", "--python", python, "install", "--quiet", "--no-index", "--no-deps"),
        wheel,
        cwd=home,
    )
    purelib = Path(run(python, "-c", PURELIB, cwd=home).stdout.strip())
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    assert str(ROOT) not in ours
    (purelib / "dependencies.pth").write_text("\n".join(sorted(ours)) + "\n", encoding="utf-8")
    return home / "bin"


PURELIB = "import sysconfig; print(sysconfig.get_paths()['purelib'])"


def test_the_wheel_holds_templates_migrations_and_examples(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {
        "mailer/templates/email/digest.html",
        "mailer/templates/web/signup.html",
        "mailer/db/migrations/env.py",
        "mailer/db/migrations/script.py.mako",
        "mailer/devtools/examples/subscribers.csv",
    } <= names
    assert any(n.startswith("mailer/db/migrations/versions/0001_") for n in names)
    assert any(n.startswith("mailer/devtools/examples/articles/") for n in names)


def test_the_installed_wheel_runs_the_demo_and_init_in_an_empty_directory(
    venv: Path, tmp_path: Path
) -> None:
    work = tmp_path / "empty"
    work.mkdir()
    where = run(venv / "python", "-c", "import mailer; print(mailer.__file__)", cwd=work)
    installed = Path(where.stdout.strip())
    assert installed.is_relative_to(venv.parent), installed
    assert not installed.is_relative_to(ROOT)

    demo = run(venv / "mailer", "demo", "--out", "out", cwd=work)
    assert "demo complete" in demo.stdout, demo.stdout
    assert list((work / "out" / "mail").glob("*.eml"))

    # A database that has never been migrated, beside the demo's config.
    fresh = work / "fresh"
    fresh.mkdir()
    config = (work / "out" / "mailer.toml").read_text(encoding="utf-8")
    assert 'url = "sqlite:///mailer.db"' in config
    (fresh / "mailer.toml").write_text(config, encoding="utf-8")
    for secret in ("secret.key", "hook.key"):  # the site's and the hook's, named by the config
        shutil.copy2(work / "out" / secret, fresh / secret)
    init = run(venv / "mailer", "--config", fresh / "mailer.toml", "init", cwd=fresh)
    assert init.stdout.startswith("database ready at revision "), init.stdout
    listed = run(
        venv / "mailer", "--config", fresh / "mailer.toml", "subscribers", "list", cwd=fresh
    )
    assert "no subscribers" in listed.stdout
