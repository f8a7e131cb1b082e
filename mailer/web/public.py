"""Pages anyone may read: the privacy policy, the archive of sent issues, health, static files."""

from __future__ import annotations

import logging
from urllib.parse import urlencode
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response

from mailer.compose.messages import DigestComposer
from mailer.db.engine import probe
from mailer.db.schema import CORRECTION_DIGEST
from mailer.errors import DatabaseUnavailable, DigestError
from mailer.issues import archive
from mailer.issues.archive import ArchivedIssue, IssueLink
from mailer.issues.progress import load_content
from mailer.subscribers.links import archive_url
from mailer.web.context import WebContext
from mailer.web.pages import local_date
from mailer.web.security import ARCHIVE_CSP

log = logging.getLogger(__name__)

ARCHIVE_PAGE = 30
MAX_PAGE = 10_000
MAX_ISSUE_ID = 2**63 - 1
MAX_ISSUE_DIGITS = len(str(MAX_ISSUE_ID))
MAX_PAGE_DIGITS = len(str(MAX_PAGE))


def bounded_int(raw: str, max_digits: int) -> int | None:
    """``raw`` as a whole number if it is at most ``max_digits`` ASCII digits, else None.

    Checked before ``int()``: Python refuses strings of over 4,300 digits (a ValueError, a 500
    if it escapes), and ``str.isdigit`` alone accepts digits ``int`` cannot read ("²").
    """
    if not (0 < len(raw) <= max_digits and raw.isascii() and raw.isdigit()):
        return None
    return int(raw)


class PublicViews:
    """The pages anyone may open: the privacy policy, the stylesheet, the health check and the
    archive of sent issues."""

    def __init__(self, web: WebContext) -> None:
        self.web = web

    async def privacy(self, request: Request) -> Response:
        return self.web.pages.render("privacy.html", policy=self.web.pages.privacy_html)

    async def stylesheet(self, request: Request) -> Response:
        return Response(
            self.web.pages.stylesheet,
            media_type="text/css",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    async def embed_script(self, request: Request) -> Response:
        """The /embed page's "Copy" button: a file of ours, as its CSP (script-src 'self') asks."""
        return Response(
            self.web.pages.embed_script,
            media_type="text/javascript",
            headers={"Cache-Control": "public, max-age=3600"},
        )

    async def healthz(self, request: Request) -> Response:
        """200 if the database answers SELECT 1, else 503; JSON either way."""
        try:
            await run_in_threadpool(probe, self.web.engine)
        except (sa.exc.SQLAlchemyError, DatabaseUnavailable) as exc:
            log.warning("health check: database unavailable: %s", exc)
            return JSONResponse(
                {"status": "error", "database": "unavailable"},
                status_code=503,
                headers={"Cache-Control": "no-store"},
            )
        return JSONResponse(
            {"status": "ok", "database": "ok"}, headers={"Cache-Control": "no-store"}
        )

    async def archive(self, request: Request) -> Response:
        """The archived issues, newest first, each labelled with its digest; ``?digest=KEY``
        lists one digest's."""
        page = bounded_int(request.query_params.get("page", "1"), MAX_PAGE_DIGITS)
        if page is None or not 1 <= page <= MAX_PAGE:
            raise HTTPException(400, f"The page number must be a whole number 1–{MAX_PAGE}.")
        names = self.digest_names
        chosen = request.query_params.get("digest")
        if chosen is not None and chosen not in names:
            known = ", ".join(names) or "none"
            raise HTTPException(
                404, f"There is no digest “{chosen[:40]}” in the archive (known: {known})."
            )
        found = await run_in_threadpool(
            archive.sent_issues,
            self.web.engine,
            limit=ARCHIVE_PAGE + 1,
            offset=(page - 1) * ARCHIVE_PAGE,
            digests=tuple(names) if chosen is None else (chosen,),
        )
        return self.web.pages.render(
            "archive.html",
            issues=found[:ARCHIVE_PAGE],
            page=page,
            more=len(found) > ARCHIVE_PAGE,
            digests=names,
            chosen=chosen,
            query="" if chosen is None else "&" + urlencode({"digest": chosen}),
        )

    @property
    def digest_names(self) -> dict[str, str]:
        """The public digests' names by key, in the config's order: a digest readers are not
        offered (``public = false``) is not in the public archive either."""
        return {d.key: d.name for d in self.web.settings.digests if d.public}

    async def archived_issue(self, request: Request) -> Response:
        """One sent issue as its readers saw it, with every topic and no personal link, plus
        the web copy's bar (previous, next, the archive) and a sign-up box."""
        issue_id = bounded_int(request.path_params["issue_id"], MAX_ISSUE_DIGITS)
        if issue_id is None or issue_id > MAX_ISSUE_ID:
            raise HTTPException(404)
        html = await run_in_threadpool(self._render_issue, issue_id)
        if html is None:
            raise HTTPException(404, "There is no sent issue with this number.")
        return HTMLResponse(
            html,
            headers={
                "Content-Security-Policy": ARCHIVE_CSP,
                "Cache-Control": "public, max-age=300",
            },
        )

    def _render_issue(self, issue_id: int) -> str | None:
        settings = self.web.settings
        with self.web.engine.connect() as conn:
            # A correction is shown by its number (its mail's "View in browser"), not listed.
            public = (*self.digest_names, CORRECTION_DIGEST)
            if not archive.is_sent(conn, issue_id, digests=public):
                return None
            try:
                content = load_content(conn, issue_id, settings)
            except DigestError:
                return None
            around = archive.neighbours(conn, issue_id)
        zone = ZoneInfo(settings.site.timezone)
        web_copy = archive.WebCopy(
            heading=f"{content.digest_name}, {local_date(content.date, zone)}",
            archive_url=settings.site.base_url + "/archive",
            signup_url=settings.site.base_url + "/",
            digest_name=content.digest_name,
            previous=self._link(around.previous),
            next=self._link(around.next),
        )
        html, _text = DigestComposer(settings, content, renderer=self.web.renderer).preview(
            settings.topic_keys, web_copy=web_copy
        )
        return html

    def _link(self, issue: ArchivedIssue | None) -> IssueLink | None:
        if issue is None:
            return None
        site = self.web.settings.site
        return IssueLink(
            url=archive_url(site, issue.id),
            subject=issue.subject,
            date=local_date(issue.scheduled_for, ZoneInfo(site.timezone)),
        )
