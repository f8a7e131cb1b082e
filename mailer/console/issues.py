"""The issue pages (``/staff/issues``, ``/staff/issues/{id}``) and what staff do to an issue.

Each action calls what the CLI's command calls (``review_actions.approve|hold|skip|
drop_article|set_note``, ``progress.retry``, ``staff.testsend``) with ``by`` the staff
member, and answers with a 303 back to the issue and a one-line notice. An action the issue's
state refuses (or any project error) shows the issue page again with the library's message,
as a 409: nothing was changed.

Each variant of an issue is shown in a sandboxed frame (``/staff/issues/{id}/variants/{n}``)
whose response carries its own CSP: the digest's inline styles and remote images, no
script, an opaque origin, framed only by the console.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Protocol

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import FormData
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import Route

from mailer.compose.dkim import signer_for
from mailer.config.settings import Settings
from mailer.console.context import Console
from mailer.console.guard import StaffMember
from mailer.console.inputs import last_page, page_number, parse_id
from mailer.console.outcomes import segments
from mailer.console.wording import sentence
from mailer.db import audit
from mailer.db.engine import writing
from mailer.db.schema import WAITING_ISSUE_STATUSES
from mailer.delivery.policy import Outcome as SendOutcome
from mailer.errors import DatabaseUnavailable, MailerError, UnknownIssueError
from mailer.issues import progress, review_actions
from mailer.issues.report import FINAL_ISSUE, build_report
from mailer.issues.report_text import report_view
from mailer.issues.review import Outcome as Decided
from mailer.issues.variants import issue_variants, render_topics, render_variant
from mailer.staff import testsend

log = logging.getLogger(__name__)

PER_PAGE = 25
# The variant frame: the digest as readers see it (inline styles, remote images), no script,
# an opaque origin (``sandbox``), framed only by our own pages.
VARIANT_CSP = (
    "sandbox; default-src 'none'; style-src 'unsafe-inline'; img-src https: data:; "
    "frame-ancestors 'self'; base-uri 'none'; form-action 'none'"
)
VARIANT_HEADERS = {
    "Content-Security-Policy": VARIANT_CSP,
    "X-Frame-Options": "SAMEORIGIN",
    "Cache-Control": "no-store",
    "X-Robots-Tag": "noindex",
}


def routes(console: Console) -> list[Route]:
    """The issue list, an issue, its variants and its actions."""
    views = IssueViews(console)
    actions: dict[str, Callable[[Request], Awaitable[Response]]] = {
        "approve": views.approve,
        "hold": views.hold,
        "skip": views.skip,
        "drop": views.drop,
        "note": views.note,
        "test-send": views.test_send,
        "retry": views.retry,
    }
    return [
        Route("/issues", views.listing, methods=["GET"]),
        Route("/issues/{issue_id}", views.issue, methods=["GET"]),
        Route("/issues/{issue_id}/variants/{number}", views.variant, methods=["GET"]),
        *(
            Route(f"/issues/{{issue_id}}/{name}", view, methods=["POST"])
            for name, view in actions.items()
        ),
    ]


class Decision(Protocol):
    """``review_actions.approve``, ``hold`` or ``skip``."""

    def __call__(
        self, engine: sa.Engine, settings: Settings, issue_id: int, *, by: str, now: datetime
    ) -> Decided: ...


def _issue_id(request: Request) -> int:
    """The issue the path names; a 404 page if it is not an id."""
    issue_id = parse_id(request.path_params["issue_id"])
    if issue_id is None:
        raise HTTPException(404, "There is no such issue.")
    return issue_id


class IssueViews:
    def __init__(self, console: Console) -> None:
        self.console = console

    # ------------------------------------------------------------ pages

    async def listing(self, request: Request) -> Response:
        console = self.console
        member = await console.guard.page(request)
        engine = console.web.engine

        def listed(page: int) -> list[progress.IssueSummary]:
            return progress.list_issues(engine, limit=PER_PAGE + 1, offset=(page - 1) * PER_PAGE)

        page = page_number(request)
        found = await run_in_threadpool(listed, page)
        if not found and page > 1:
            # Past the end (an old link, a typed number): the last page there is.
            total = await run_in_threadpool(progress.count_issues, engine)
            page = last_page(total, PER_PAGE)
            found = await run_in_threadpool(listed, page)
        return console.render(
            request,
            "issues.html",
            member,
            section="issues",
            issues=found[:PER_PAGE],
            page=page,
            more=len(found) > PER_PAGE,
            segments=segments,
        )

    async def issue(self, request: Request) -> Response:
        member = await self.console.guard.page(request)
        issue_id = _issue_id(request)
        return await self._issue_page(request, member, issue_id)

    async def _issue_page(
        self, request: Request, member: StaffMember, issue_id: int, *, error: str | None = None
    ) -> Response:
        console = self.console
        web = console.web
        now = web.clock()
        try:
            summary = await run_in_threadpool(progress.summarize, web.engine, issue_id)
        except UnknownIssueError as exc:
            raise HTTPException(404, f"There is no such issue: {exc}.") from exc
        state = await run_in_threadpool(
            review_actions.review_state, web.engine, web.settings, issue_id, now=now
        )
        variants = await run_in_threadpool(
            issue_variants, web.engine, web.settings, issue_id, now=now
        )
        report: dict[str, Any] | None = None
        if summary.status not in WAITING_ISSUE_STATUSES:
            built = await run_in_threadpool(
                build_report, web.engine, web.settings, issue_id, now=now
            )
            report = report_view(built)
        waiting = summary.status in WAITING_ISSUE_STATUSES
        digest = web.settings.find_digest(summary.digest)
        return console.pages.render(
            "issue.html",
            member,
            status=409 if error else 200,
            section="issues",
            notice=None if error else console.notice(request, member),
            error=error,
            issue=summary,
            state=state,
            digest=digest,
            variants=variants,
            report=report,
            waiting=waiting,
            may_approve=summary.status in ("review", "held"),
            may_hold=summary.status in ("review", "approved"),
            may_retry=summary.status not in (*WAITING_ISSUE_STATUSES, "cancelled", "skipped")
            and bool(summary.counts.get("deferred") or summary.counts.get("unknown")),
            final=summary.status in FINAL_ISSUE,
            segments=segments,
            staff_email=member.email,
        )

    async def variant(self, request: Request) -> Response:
        console = self.console
        await console.guard.page(request)
        issue_id = _issue_id(request)
        number = parse_id(request.path_params["number"])
        if number is None:
            raise HTTPException(404, "There is no such variant of this issue.")
        web = console.web
        # The issue page names the variant's topics in the frame's address: the frame renders
        # them at once. Finding the nth variant from its number alone counts the readers of
        # every variant again (their order is by readers), one query over every recipient's
        # topics per frame: only a frame opened by an address without its topics does that.
        topics = tuple(t for t in request.query_params.get("topics", "").split(",") if t)
        try:
            if topics:
                html, _text = await run_in_threadpool(
                    lambda: render_topics(
                        web.engine, web.settings, issue_id, topics, renderer=web.renderer
                    )
                )
            else:
                _variant, html, _text = await run_in_threadpool(
                    lambda: render_variant(
                        web.engine,
                        web.settings,
                        issue_id,
                        number,
                        now=web.clock(),
                        renderer=web.renderer,
                    )
                )
        except DatabaseUnavailable:
            raise  # the app's 503 page: an outage is not a missing variant
        except MailerError as exc:
            raise HTTPException(404, sentence(exc)) from exc
        return HTMLResponse(html, headers=VARIANT_HEADERS)

    # ------------------------------------------------------------ actions

    async def approve(self, request: Request) -> Response:
        return await self._decide(request, review_actions.approve, "approved")

    async def hold(self, request: Request) -> Response:
        return await self._decide(request, review_actions.hold, "held")

    async def skip(self, request: Request) -> Response:
        return await self._decide(request, review_actions.skip, "skipped")

    async def _decide(self, request: Request, act: Decision, done: str) -> Response:
        async def run(member: StaffMember, form: FormData, issue_id: int) -> str:
            web = self.console.web
            outcome = await run_in_threadpool(
                act, web.engine, web.settings, issue_id, by=member.by, now=web.clock()
            )
            then = ""
            if outcome.status == "sending":
                then = ": it is going out now"
            elif outcome.status == "empty":
                then = ": nobody would receive it now, so it is empty"
            elif outcome.status == "skipped":
                then = ": nothing is sent; its articles go in the next issue"
            elif outcome.status == "held":
                then = ": it waits for an approve"
            return f"Issue {issue_id} {done} by {member.by}{then}."

        return await self._act(request, run)

    async def drop(self, request: Request) -> Response:
        async def run(member: StaffMember, form: FormData, issue_id: int) -> str:
            web = self.console.web
            article_id = _form_number(form, "article")
            dropped = await run_in_threadpool(
                lambda: review_actions.drop_article(
                    web.engine,
                    issue_id,
                    article_id,
                    by=member.by,
                    now=web.clock(),
                    settings=web.settings,
                    renderer=web.renderer,
                )
            )
            return (
                f"Article {article_id} ({dropped.title}) dropped from issue {issue_id};"
                f" {dropped.left} left."
            )

        return await self._act(request, run)

    async def note(self, request: Request) -> Response:
        async def run(member: StaffMember, form: FormData, issue_id: int) -> str:
            web = self.console.web
            clear = form.get("clear") == "1"
            raw = form.get("note", "")
            text = None if clear else (raw if isinstance(raw, str) else "")
            stored = await run_in_threadpool(
                lambda: review_actions.set_note(
                    web.engine, issue_id, text, by=member.by, now=web.clock()
                )
            )
            if stored is None:
                return f"The note of issue {issue_id} is removed."
            return f"The note of issue {issue_id} is set."

        return await self._act(request, run)

    async def retry(self, request: Request) -> Response:
        async def run(member: StaffMember, form: FormData, issue_id: int) -> str:
            web = self.console.web
            now = web.clock()
            count = await run_in_threadpool(
                lambda: progress.retry(web.engine, issue_id, by=member.by, now=now)
            )
            if not count:
                return f"Issue {issue_id} has no deferred delivery to retry."
            return f"{count:,} deliveries of issue {issue_id} are due again now."

        return await self._act(request, run)

    async def test_send(self, request: Request) -> Response:
        async def run(member: StaffMember, form: FormData, issue_id: int) -> str:
            web = self.console.web
            now = web.clock()
            summary = await run_in_threadpool(progress.summarize, web.engine, issue_id)
            prepared = await run_in_threadpool(
                lambda: testsend.prepare_issue(
                    web.engine,
                    web.settings,
                    issue_id,
                    summary.digest,
                    now=now,
                    renderer=web.renderer,
                )
            )
            # A staff account is staff: its own address needs no [staff].emails entry.
            sign = signer_for(web.settings)
            # Rendering the copy is CPU work: in a thread, not on the event loop.
            copies = await run_in_threadpool(
                lambda: testsend.test_copies(
                    web.settings, prepared, [member.email], now=now, renderer=web.renderer
                )
            )
            results = await testsend.send_test(web.settings, copies, sign=sign)
            result = results[0]
            sent = result.outcome is SendOutcome.SENT
            await run_in_threadpool(
                self._record,
                "staff.test_send",
                member,
                issue=issue_id,
                to=member.email,
                reader=prepared.reader.id,
                sent=sent,
            )
            if not sent:
                reply = f"{result.code} {result.reply}" if result.code else result.reply
                raise _Refused(f"the relay refused the test copy to {member.email}: {reply}")
            return (
                f"A test copy of issue {issue_id} went to {member.email}"
                f" (as reader {prepared.reader.email} sees it)."
            )

        return await self._act(request, run)

    def _record(self, kind: str, member: StaffMember, **detail: Any) -> None:
        web = self.console.web
        with writing(web.engine) as conn:
            audit.record(conn, None, kind, web.clock(), by=member.by, **detail)

    async def _act(
        self,
        request: Request,
        run: Callable[[StaffMember, FormData, int], Awaitable[str]],
    ) -> Response:
        member, form = await self.console.guard.action(request)
        issue_id = _issue_id(request)
        try:
            notice = await run(member, form, issue_id)
        except UnknownIssueError as exc:
            raise HTTPException(404, f"There is no such issue: {exc}.") from exc
        except DatabaseUnavailable:
            raise  # the app's 503 page: an outage is not a refused action
        except (MailerError, _Refused) as exc:
            log.info("staff action refused", extra={"issue": issue_id, "error": str(exc)})
            return await self._issue_page(request, member, issue_id, error=sentence(exc))
        return self.console.redirect(f"/issues/{issue_id}", notice=notice, member=member)


class _Refused(Exception):
    """The relay refused a test copy: shown on the issue page like a refused action."""


def _form_number(form: FormData, name: str) -> int:
    value = parse_id(form.get(name))
    if value is None:
        raise HTTPException(400, f"The form's {name} is missing or not a number we know.")
    return value
