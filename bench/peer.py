"""The peer: django-newsletter's own sending command, side by side with us, same sink.

django-newsletter (PyPI) is the closest existing Python newsletter. This script makes a
throwaway virtualenv for it under $MAILER_BENCH_DIR (default /tmp/mailer-bench; never part of
the repository), a minimal Django project around it (SQLite, Django's SMTP email backend
pointed at the same Postfix ``smtp-sink``), one newsletter message holding the same articles
as mailer/devtools/examples/articles (title, summary and "why this matters", link), N
subscriptions and one prepared submission; then it times ``manage.py submit_newsletter`` as a
subprocess (CPU and peak RSS from wait4). In the same run, on the same sink, it times our
``mailer digest send`` of the same articles to the same N (bench/send.py's measurement,
SQLite).

django-newsletter renders each message with Django templates, builds an
``EmailMultiAlternatives`` per subscriber and sends each over a new SMTP connection
(``message.send()`` without a shared connection): that is its design, measured as shipped.

    .venv/bin/python bench/peer.py --n 10000 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import _lib
import send

PEER = _lib.WORK / "peer"
PEER_VENV = _lib.WORK / "peer-venv"
PEER_PY = PEER_VENV / "bin" / "python"

SETTINGS = """\
SECRET_KEY = "bench-only"
DEBUG = False
ALLOWED_HOSTS = ["*"]
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sites",
    "newsletter",
]
DATABASES = {{"default": {{"ENGINE": "django.db.backends.sqlite3", "NAME": {db!r}}}}}
SITE_ID = 1
ROOT_URLCONF = "peer_urls"
DEFAULT_AUTO_FIELD = "django.db.models.AutoField"
TEMPLATES = [{{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True}}]
EMAIL_BACKEND = "django.core.mail.backends.smtp.EmailBackend"
EMAIL_HOST = "127.0.0.1"
EMAIL_PORT = {port}
NEWSLETTER_THUMBNAIL = "sorl-thumbnail"  # only names a template; no article has an image
NEWSLETTER_CONFIRM_EMAIL = False
LOGGING = {{"version": 1, "disable_existing_loggers": False,
           "root": {{"level": "WARNING"}}}}
"""

URLS = """\
from django.urls import include, path

urlpatterns = [path("newsletter/", include("newsletter.urls"))]
"""

SETUP = """\
import json, sys
from datetime import timedelta

import django
django.setup()
from django.contrib.sites.models import Site
from django.core.management import call_command
from django.utils.timezone import now
from newsletter.models import Article, Message, Newsletter, Submission, Subscription

n = int(sys.argv[1])
articles = json.loads(sys.argv[2])
call_command("migrate", verbosity=0)
Site.objects.update_or_create(id=1, defaults={"domain": "news.example.org", "name": "news"})
newsletter = Newsletter.objects.create(
    title="Camp Lejeune & New River Updates", slug="updates",
    email="digest@news.example.org", sender="Camp Lejeune & New River Updates",
)
message = Message.objects.create(title="Weekly digest", slug="weekly", newsletter=newsletter)
for i, a in enumerate(articles):
    Article.objects.create(
        post=message, sortorder=i, title=a["title"], text=a["text"], url=a["url"]
    )
Subscription.objects.bulk_create(
    [
        Subscription(newsletter=newsletter, name_field=f"Reader {i}",
                     email_field=f"reader{i}@example.org", subscribed=True)
        for i in range(n)
    ],
    batch_size=5000,
)
submission = Submission.from_message(message)
submission.prepared = True
submission.publish_date = now() - timedelta(minutes=1)
submission.save()
one = submission.get_message(Subscription.objects.first())
print(len(one.message().as_bytes(linesep="\\r\\n")))
"""


def ensure_venv() -> None:
    """A throwaway virtualenv with django-newsletter from PyPI (made once per machine)."""
    if PEER_PY.exists() and (PEER_VENV / ".installed").exists():
        return
    _lib.WORK.mkdir(parents=True, exist_ok=True)
    print("making the peer's virtualenv (django-newsletter from PyPI)...", file=sys.stderr)
    subprocess.run([sys.executable, "-m", "venv", str(PEER_VENV)], check=True)
    subprocess.run(
        # sorl-thumbnail: newsletter.fields imports it (or easy-thumbnails) unconditionally.
        [str(PEER_PY), "-m", "pip", "install", "--quiet", "django-newsletter", "sorl-thumbnail"],
        check=True,
    )
    (PEER_VENV / ".installed").touch()


def peer_version() -> str:
    out = subprocess.run(
        [
            str(PEER_PY),
            "-c",
            "import django, importlib.metadata as m; "
            "print(m.version('django-newsletter'), django.get_version())",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return f"django-newsletter {out[0]} (Django {out[1]})"


def article_payload() -> str:
    """The example articles as the peer holds them: what our digest shows of each."""
    items = []
    for a in _lib.issue_articles(datetime.now(UTC)):
        text = f"<p>{a.summary}</p>\n<p><strong>Why this matters:</strong> {a.why_it_matters}</p>"
        items.append({"title": a.title, "text": text, "url": a.link or ""})
    return json.dumps(items)


def prepare(n: int, port: int, tag: str) -> tuple[Path, int]:
    """A fresh peer project with N subscriptions and a prepared submission; its message size."""
    project = PEER / tag
    project.mkdir(parents=True, exist_ok=True)
    db = project / "peer.sqlite3"
    db.unlink(missing_ok=True)
    (project / "peer_settings.py").write_text(SETTINGS.format(db=str(db), port=port))
    (project / "peer_urls.py").write_text(URLS)
    (project / "peer_setup.py").write_text(SETUP)
    env = peer_env(project)
    out = subprocess.run(
        [str(PEER_PY), "peer_setup.py", str(n), article_payload()],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        raise RuntimeError(f"peer setup failed: {out.stderr[-3000:]}")
    return project, int(out.stdout.split()[-1])


def peer_env(project: Path) -> dict[str, str]:
    return dict(
        os.environ,
        DJANGO_SETTINGS_MODULE="peer_settings",
        PYTHONPATH=str(project),
        PYTHONWARNINGS="ignore",
    )


def peer_send(sink: _lib.Sink, project: Path, n: int) -> tuple[_lib.Measured, int]:
    base = sink.received
    child = _lib.Child(
        [str(PEER_PY), "-m", "django", "submit_newsletter", "--verbosity", "0"],
        env=peer_env(project),
    )
    measured = child.wait()
    if measured.returncode != 0:
        raise RuntimeError(f"submit_newsletter failed: {measured.stderr[-3000:]}")
    time.sleep(0.3)
    return measured, sink.received - base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16, help="ours: [smtp].connections")
    parser.add_argument("--processes", type=int, default=2, help="ours: `digest send --processes`")
    parser.add_argument("--workers", type=int, default=0, help="ours: extra `worker --drain`s")
    parser.add_argument(
        "--defaults",
        action="store_true",
        help="ours with the example config's defaults (no connections or processes set)",
    )
    parser.add_argument("--keep-templates", action="store_true")
    args = parser.parse_args()

    _lib.ensure_postfix()
    ensure_venv()
    print(
        f"# peer: N={args.n:,}; {peer_version()}; ours: "
        + (
            "the defaults"
            if args.defaults
            else f"{args.connections} connections x {args.processes * (1 + args.workers)} processes"
        )
        + f", SQLite; {_lib.machine()};"
        f" {datetime.now(UTC):%Y-%m-%d %H:%M} UTC; load {_lib.load_avg()}",
        flush=True,
    )
    _lib.discard_database(_lib.fresh_database("sqlite", args.n, "warmup"))
    pairs: list[tuple[float, float, _lib.Measured, send.Ours]] = []
    try:
        with _lib.Sink() as sink:
            for run in range(args.runs):
                project, size = prepare(args.n, sink.port, f"run{run}")
                print(f"run {run + 1}: {_lib.wait_quiet()}", flush=True)
                measured, received = peer_send(sink, project, args.n)
                if received != args.n:
                    raise RuntimeError(f"the peer sent {received} of {args.n}")
                peer_rate = args.n / measured.wall
                o = send.ours(
                    sink,
                    kind="sqlite",
                    n=args.n,
                    connections=None if args.defaults else args.connections,
                    workers=args.workers,
                    batch_size=500,
                    dkim_key=None,
                    tag=f"peer-{os.getpid()}",
                    processes=None if args.defaults else args.processes,
                )
                pairs.append((peer_rate, o.rate, measured, o))
                print(
                    f"run {run + 1}: django-newsletter {peer_rate:6,.0f} msg/s"
                    f" ({measured.wall:.1f} s, {measured.cpu / args.n * 1000:.2f} CPU s/1000,"
                    f" RSS {measured.max_rss_mb:.0f} MB, {size:,} bytes/message) |"
                    f" us {o.rate:6,.0f} msg/s ({o.wall:.1f} s, {o.cpu_per_1000:.2f} CPU s/1000)"
                    f" | us / peer {o.rate / peer_rate:5.1f}x",
                    flush=True,
                )
    finally:
        if not args.keep_templates:
            _lib.drop_templates()
        _lib.stop_postfix_daemon()
    print()
    print("| N | django-newsletter msg/s | CPU s per 1,000 | peak RSS MB | us msg/s | us / peer |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.n:,} | {_lib.median_range([p for p, *_ in pairs])} "
        f"| {_lib.median_range([m.cpu / args.n * 1000 for _, _, m, _ in pairs], '{:.2f}')} "
        f"| {_lib.median_range([m.max_rss_mb for _, _, m, _ in pairs])} "
        f"| {_lib.median_range([u for _, u, _, _ in pairs])} "
        f"| {_lib.median_range([u / p for p, u, _, _ in pairs], '{:.1f}')}x |"
    )


if __name__ == "__main__":
    main()
