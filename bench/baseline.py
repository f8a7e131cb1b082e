"""A source tree of an older commit, to time side by side with the current one.

``git archive REV`` (read-only) unpacked into $MAILER_BENCH_DIR/baseline-REV; then
``bench/send.py --compare DIR`` runs that tree's CLI in every run beside the current one, on
the same databases and the same sink. It uses the current .venv, so the older commit must
share the current dependencies and schema revision.

    .venv/bin/python bench/baseline.py --rev 31f5beb
"""

from __future__ import annotations

import argparse
import shutil
import subprocess

import _lib


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rev", default="HEAD", help="the commit to unpack")
    args = parser.parse_args()
    rev = subprocess.run(
        ["git", "rev-parse", "--short", args.rev],
        cwd=_lib.ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    target = _lib.WORK / f"baseline-{rev}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    archive = subprocess.run(
        ["git", "archive", rev], cwd=_lib.ROOT, capture_output=True, check=True
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    print(target)


if __name__ == "__main__":
    main()
