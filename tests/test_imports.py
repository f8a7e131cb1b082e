"""What a command loads: sending must not pay for the scheduler, the web server or the feeds.

Every module imported before a send is memory in every sending process (the helpers are
forked with it) and time before the first message.
"""

from __future__ import annotations

import subprocess
import sys

# Loaded only by the commands that use them: `run`, `web`, `articles fetch`, `sink` (the cron
# triggers are loaded by every command: the config checks its cron expressions).
NOT_FOR_SENDING = (
    "apscheduler.schedulers",
    "uvicorn",
    "starlette",
    "httpx",
    "feedparser",
    "nh3",
    "aiosmtpd",
)


def test_the_command_line_and_the_send_path_load_no_service_web_or_feed_module() -> None:
    code = (
        "import sys\n"
        "import mailer.cli, mailer.delivery.sending, mailer.issues.staff\n"
        f"print(sorted(m for m in {NOT_FOR_SENDING!r} if m in sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"
