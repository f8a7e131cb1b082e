"""The staff console walked end to end in Chromium, as an editor's Friday morning goes: the
one-time link from ``mailer staff add``, a password, the dashboard over what ``mailer demo``
leaves, an issue approved, a send watched, a logout that ends the session. Screenshots of
every page at phone and desktop sizes (kept under ``$MAILER_SCREENSHOTS``).

SQLite only: the demo writes its own SQLite database, and that database is the point."""

from __future__ import annotations

import io
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from rich.console import Console

from mailer.cli import cli
from mailer.clock import now
from mailer.compose.rendering import Renderer
from mailer.config.load import load_settings
from mailer.config.settings import Settings
from mailer.console import sessions
from mailer.content.store import upsert_articles
from mailer.db.schema import deliveries, events, subscribers
from mailer.devtools.demo import run_demo
from mailer.issues.create import create_issue
from mailer.issues.schedule import slots_between
from tests.browser import DESKTOP, PHONE, fits, page_at
from tests.console import mark, status_of
from tests.factories import make_article
from tests.served import serve

pytestmark = [pytest.mark.browser, pytest.mark.slow]

STAFF = "walker@news.example.org"
PASSWORD = "a long walk on the base"
SIZES = ((PHONE, "390"), (DESKTOP, "1280"))


def demo_settings(config: Path, base: str) -> Settings:
    """The demo's settings, served at ``base``; its weekly digest has a review window (open
    now), so that an issue can wait in review."""
    loaded = load_settings(config, env={})
    digests = tuple(
        replace(d, review_minutes=8 * 24 * 60, on_unreviewed="hold") if d.key == "weekly" else d
        for d in loaded.digests
    )
    site = replace(loaded.site, base_url=base, privacy_policy_url=base + "/privacy")
    return replace(loaded, site=site, digests=digests)


def in_review(engine: sa.Engine, settings: Settings) -> int:
    """The weekly digest's next issue, made for review with a fresh article."""
    moment = now()
    upsert_articles(
        engine,
        [
            make_article(
                topic="local-events",
                title="Fall festival moves to the parade field",
                published_at=moment - timedelta(minutes=2),
            )
        ],
        now=moment - timedelta(minutes=1),
    )
    digest = settings.digest("weekly")
    slot = slots_between(digest, moment, moment + timedelta(days=8))[0]
    made = create_issue(
        engine,
        settings,
        digest,
        scheduled_for=slot,
        now=moment,
        render_subject=Renderer().render_subject,
    )
    assert status_of(engine, made.issue_id) == "review"
    return made.issue_id


def sending(engine: sa.Engine, settings: Settings) -> int:
    """An issue of the alerts digest going out now: its deliveries queued, none sent."""
    moment = now()
    upsert_articles(
        engine,
        [
            make_article(
                topic="base-alerts",
                title="Gate 2 closed for resurfacing",
                published_at=moment - timedelta(minutes=1),
            )
        ],
        now=moment,
    )
    made = create_issue(
        engine,
        settings,
        settings.digest("alerts"),
        scheduled_for=moment,
        now=moment,
        render_subject=Renderer().render_subject,
        reviewed=False,
    )
    assert status_of(engine, made.issue_id) == "sending"
    return made.issue_id


def queued(engine: sa.Engine, issue_id: int) -> int:
    with engine.connect() as conn:
        return int(
            conn.scalar(
                sa.select(sa.func.count())
                .select_from(deliveries)
                .where(deliveries.c.issue_id == issue_id, deliveries.c.status == "queued")
            )
            or 0
        )


class Walk:
    """The page, and the screenshots it leaves: ``walk-NN-name-390.png`` and ``-1280.png``."""

    def __init__(self, page: Any, shots: Path) -> None:
        self.page = page
        self.shots = shots
        self.number = 0
        self.taken: list[str] = []

    def shot(self, name: str) -> None:
        """Screenshots of the whole page at each size; nothing scrolls sideways at either."""
        self.number += 1
        for viewport, label in SIZES:
            self.page.set_viewport_size(viewport)
            assert fits(self.page), (name, label)
            file = self.shots / f"walk-{self.number:02d}-{name}-{label}.png"
            self.charts_drawn()
            if self.page.locator("figure.variant iframe").count():
                self.frames_in_view(viewport)
            self.page.screenshot(path=str(file), full_page=True)
            self.taken.append(file.name)
        self.page.set_viewport_size(PHONE)

    def charts_drawn(self) -> None:
        """Each chart's picture has arrived and decoded (they load lazily, as the reader
        scrolls to them)."""
        from playwright.sync_api import expect

        images = self.page.locator("img.chart-image")
        for n in range(images.count()):
            images.nth(n).scroll_into_view_if_needed()
            expect(images.nth(n)).not_to_have_js_property("naturalWidth", 0)

    def frames_in_view(self, viewport: dict[str, int]) -> None:
        """A window as tall as the page, so that every variant frame is in view, as each is
        for a reader who scrolls to it, and each frame's mail is there.

        Chromium does not paint a cross-origin frame (a sandboxed one has an opaque origin)
        while it is out of the viewport; a full-page screenshot does not bring it in, so it
        would show an empty frame a reader never sees."""
        from playwright.sync_api import expect

        page = self.page
        height = int(page.evaluate("document.documentElement.scrollHeight"))
        page.set_viewport_size({"width": viewport["width"], "height": height})
        frames = page.locator("figure.variant iframe")
        for n in range(frames.count()):
            body = page.frame_locator("figure.variant iframe").nth(n).locator("body")
            expect(body).not_to_have_text("")


def test_a_staff_member_walks_the_console_in_chromium(
    browser: Any, shots: Path, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    demo = tmp_path / "demo"
    # The demo runs its own event loops: in a thread of its own, beside Playwright's.
    with ThreadPoolExecutor(1) as pool:
        figures = pool.submit(
            run_demo, demo, console=Console(file=io.StringIO(), width=200)
        ).result()
    config = demo / "mailer.toml"
    demo_issue = int(figures["issue"])

    with serve(lambda base: demo_settings(config, base)) as (server, engine, settings):
        review_id = in_review(engine, settings)
        # 1. `mailer staff add` prints the one-time link (to the configured public address).
        added = CliRunner().invoke(
            cli,
            ["--config", str(config), "staff", "add", STAFF, "--role", "admin"],
            catch_exceptions=False,
        )
        assert added.exit_code == 0, added.output
        found = re.search(r"https://news\.example\.org(/staff/welcome/\S+)", added.output)
        assert found, added.output
        page = page_at(browser, PHONE)
        walk = Walk(page, shots)
        try:
            # 2. The link, on a phone: a password; then the login.
            page.goto(server.url + found.group(1))
            expect(page.get_by_role("heading", name="Set your password")).to_be_visible()
            page.get_by_label("New password").fill(PASSWORD)
            page.get_by_label("The same again").fill(PASSWORD)
            walk.shot("welcome")
            page.get_by_role("button", name="Set password").click()
            page.wait_for_url(re.compile(r".*/staff/login\?notice=.*"))
            expect(page.locator("main")).to_contain_text("Your password is set")
            page.get_by_label("Email address").fill(STAFF)
            page.get_by_label("Password").fill(PASSWORD)
            walk.shot("login")
            page.get_by_role("button", name="Log in").click()
            page.wait_for_url(f"{server.url}/staff/")

            # 3. The dashboard: the demo's issue, sent, and its charts with their tables.
            recent = page.locator("table.recent tbody tr").filter(
                has=page.get_by_role("link", name=str(demo_issue), exact=True)
            )
            expect(recent).to_contain_text(status_of(engine, demo_issue))
            expect(recent.locator("svg.outcome-bar")).to_have_count(1)
            charts = page.locator("figure.chart")
            assert charts.count() >= 1
            first = charts.first
            walk.charts_drawn()  # each picture decodes: naturalWidth > 0
            first.locator("summary").click()
            expect(first.locator("table tbody tr").first).to_be_visible()
            walk.shot("dashboard")

            # 4. The issue in review, approved; the page and the database say so.
            page.get_by_role("link", name=f"Issue {review_id}").first.click()
            page.wait_for_url(f"{server.url}/staff/issues/{review_id}")
            expect(page.locator("[data-issue-status]")).to_have_text("in review")
            frame = page.frame_locator("figure.variant iframe").first
            expect(
                frame.get_by_text("Fall festival moves to the parade field").first
            ).to_be_visible()
            walk.shot("issue-in-review")
            page.get_by_role("button", name="Approve").click()
            page.wait_for_url(re.compile(rf"/staff/issues/{review_id}\?notice="))
            expect(page.get_by_role("status")).to_contain_text(
                f"Issue {review_id} approved by {STAFF}"
            )
            expect(page.locator("[data-issue-status]")).to_have_text("approved")
            assert status_of(engine, review_id) == "approved"
            with engine.connect() as conn:
                approved = conn.execute(
                    sa.select(events.c.detail).where(events.c.kind == "issue.approved")
                ).all()
            assert [dict(row.detail)["by"] for row in approved] == [STAFF]
            walk.shot("issue-approved")
            for n in range(page.locator("figure.variant").count()):
                for viewport, label in SIZES:
                    page.set_viewport_size(viewport)
                    variant = page.locator("figure.variant").nth(n)
                    variant.scroll_into_view_if_needed()
                    expect(
                        page.frame_locator("figure.variant iframe").nth(n).locator("body")
                    ).not_to_have_text("")
                    variant.screenshot(
                        path=str(shots / f"walk-{walk.number:02d}-variant-{n + 1}-{label}.png")
                    )
                page.set_viewport_size(PHONE)

            # 5. A send in progress: the figures follow the deliveries without a reload.
            sending_id = sending(engine, settings)
            total = queued(engine, sending_id)
            assert total >= 3
            page.get_by_role("link", name="Dashboard").click()
            page.wait_for_url(f"{server.url}/staff/")
            card = page.locator(f'[data-issue="{sending_id}"]')
            sent = card.locator('[data-field="sent"]')
            expect(sent).to_have_text("0")
            loads: list[Any] = []
            page.on("load", lambda loaded: loads.append(loaded))
            mark(engine, sending_id, "sent", 1, now())
            expect(sent).to_have_text("1")
            mark(engine, sending_id, "sent", 1, now())
            mark(engine, sending_id, "deferred", 1, now())
            expect(sent).to_have_text("2")
            expect(card.locator('[data-field="deferred"]')).to_have_text("1")
            # A deferred delivery is still to go.
            expect(card.locator('[data-field="left"]')).to_have_text(f"{total - 2:,}")
            assert loads == []
            walk.shot("sending")

            # The rest of the console, as an admin sees it.
            page.goto(f"{server.url}/staff/subscribers")
            expect(page.get_by_role("heading", level=1)).to_be_visible()
            walk.shot("subscribers")
            with engine.connect() as conn:
                someone = conn.scalar(sa.select(sa.func.min(subscribers.c.id)))
            page.goto(f"{server.url}/staff/subscribers/{someone}")
            expect(page.get_by_role("heading", level=1)).to_be_visible()
            walk.shot("subscriber")
            for name in ("articles", "sources", "charts", "accounts", "issues"):
                page.goto(f"{server.url}/staff/{name}")
                expect(page.get_by_role("heading", level=1)).to_be_visible()
                walk.shot(name)

            # 6. Logged out: the cookie from before no longer opens the console.
            cookie = next(c for c in page.context.cookies() if c["name"] == sessions.COOKIE_NAME)
            page.get_by_role("button", name="Log out").click()
            page.wait_for_url(re.compile(r".*/staff/login\?notice=.*"))
            expect(page.locator("main")).to_contain_text("You are logged out.")
            walk.shot("logged-out")
            page.context.add_cookies([cookie])
            page.goto(f"{server.url}/staff/")
            expect(page).to_have_url(re.compile(r".*/staff/login\?next=.*"))
            expect(page.get_by_label("Password")).to_be_visible()
        finally:
            page.context.close()
    assert len(walk.taken) == 2 * walk.number
