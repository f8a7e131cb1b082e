"""Articles in the console (editors and admins): the latest with where each came from, one
article whole, and its retraction (``mailer articles retract``) behind a confirmation page that
says who would get the correction.
"""

from __future__ import annotations

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mailer.console.context import Console
from mailer.console.guard import StaffMember
from mailer.console.inputs import fetch_page, last_page, path_id
from mailer.console.records_common import PER_PAGE, problem
from mailer.console.wording import sentence
from mailer.content import store
from mailer.errors import DatabaseUnavailable, MailerError, UnknownArticleError
from mailer.issues import corrections

SECTION = "articles"


class ArticlePages:
    """The views; each starts with the guard (role editor)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.web = console.web

    def _problem(
        self, request: Request, member: StaffMember, status: int, title: str, text: str
    ) -> Response:
        return problem(
            self.console,
            request,
            member,
            status=status,
            title=title,
            text=text,
            section=SECTION,
            back=("The latest articles", self.console.pages.url("/articles")),
        )

    async def latest(self, request: Request) -> Response:
        """``GET /staff/articles?topic=&page=``: newest first, with origin and issues."""
        member = await self.console.guard.page(request, "editor")
        topics = self.web.topic_choices
        topic = request.query_params.get("topic") or None
        if topic not in (None, *(key for key, _ in topics)):
            topic = None
        engine = self.web.engine

        def latest(page: int) -> store.Latest:
            return store.latest(engine, topic=topic, limit=PER_PAGE, offset=(page - 1) * PER_PAGE)

        page, found = await fetch_page(request, latest, PER_PAGE)
        return self.console.render(
            request,
            "articles.html",
            member,
            section=SECTION,
            found=found,
            topics=topics,
            topic=topic or "",
            topic_names=dict(topics),
            page=page,
            pages=last_page(found.total, PER_PAGE),
        )

    async def _detail(
        self, request: Request, member: StaffMember
    ) -> store.ArticleDetail | Response:
        article_id = path_id(request, "record_id")
        if article_id is None:
            return self._problem(
                request, member, 404, "No such article", "That is not an article's id."
            )
        try:
            detail = await run_in_threadpool(store.show, self.web.engine, article_id)
        except UnknownArticleError as exc:
            return self._problem(request, member, 404, "No such article", sentence(exc))
        return detail

    async def article(self, request: Request) -> Response:
        """``GET /staff/articles/{id}``: every field, arrival, origin, issues, removal."""
        member = await self.console.guard.page(request, "editor")
        detail = await self._detail(request, member)
        if isinstance(detail, Response):
            return detail
        return self.console.render(
            request,
            "article.html",
            member,
            section=SECTION,
            detail=detail,
            a=detail.article,
            origin=detail.origin,
            topic_names=dict(self.web.topic_choices),
        )

    async def _retract_page(
        self,
        request: Request,
        member: StaffMember,
        detail: store.ArticleDetail,
        *,
        correction: str = "",
        error: str = "",
        status: int = 200,
    ) -> Response:
        try:
            audience = await run_in_threadpool(
                corrections.audience, self.web.engine, detail.article.id
            )
        except UnknownArticleError as exc:
            return self._problem(request, member, 404, "No such article", sentence(exc))
        return self.console.render(
            request,
            "article_retract.html",
            member,
            status=status,
            section=SECTION,
            a=detail.article,
            audience=audience,
            correction=correction,
            error=error,
            limit=corrections.MAX_CORRECTION,
        )

    async def retract_page(self, request: Request) -> Response:
        """``GET /staff/articles/{id}/retract``: who would get a correction, and the form."""
        member = await self.console.guard.page(request, "editor")
        detail = await self._detail(request, member)
        if isinstance(detail, Response):
            return detail
        return await self._retract_page(request, member, detail)

    async def retract(self, request: Request) -> Response:
        """``POST``: retract, with a correction if text was given (``corrections.retract``)."""
        member, form = await self.console.guard.action(request, "editor")
        detail = await self._detail(request, member)
        if isinstance(detail, Response):
            return detail
        raw = form.get("correction")
        text = raw.strip() if isinstance(raw, str) else ""
        try:
            done = await run_in_threadpool(
                lambda: corrections.retract(
                    self.web.engine,
                    self.web.settings,
                    detail.article.id,
                    correction=text or None,
                    by=member.by,
                    now=self.web.clock(),
                )
            )
        except DatabaseUnavailable:
            raise  # the app's 503 page: an outage is not a refused retraction
        except MailerError as exc:
            return await self._retract_page(
                request, member, detail, correction=text, error=sentence(exc), status=400
            )
        return self.console.redirect(
            f"/articles/{detail.article.id}", notice=_said(done, asked=bool(text)), member=member
        )


def _said(done: corrections.Retraction, *, asked: bool) -> str:
    """What the retraction did, in one notice (the lines ``mailer articles retract`` prints)."""
    removal = done.removal
    where = ", ".join(str(i) for i in removal.issues) or "none"
    if removal.already:
        head = f"Article {removal.article_id} was already retracted."
    else:
        head = f"Article {removal.article_id} retracted; taken out of unsent issues: {where}."
    if done.already_corrected:
        issue = done.correction_issue
        return head + f" A correction was already made (issue {issue}); none is sent again."
    if done.correction_issue is not None:
        readers = "reader" if done.received == 1 else "readers"
        who = f"the {done.received} {readers} who received it"
        if done.recipients < done.received:
            who = f"{done.recipients} of {who} (the others no longer receive mail)"
        return head + f" Correction queued as issue {done.correction_issue}, to {who}."
    if asked:
        return head + " It was never sent to anyone, so no correction is needed."
    if done.received:
        return head + f" {done.received} readers received it; no correction was sent."
    return head


def routes(console: Console) -> list[Route]:
    views = ArticlePages(console)
    one = "/articles/{record_id}"
    return [
        Route("/articles", views.latest, methods=["GET"]),
        Route(one, views.article, methods=["GET"]),
        Route(one + "/retract", views.retract_page, methods=["GET"]),
        Route(one + "/retract", views.retract, methods=["POST"]),
    ]
