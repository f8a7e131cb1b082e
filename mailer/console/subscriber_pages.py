"""Subscribers in the console (admins only): search, a person's record, their data as JSON,
unsubscribe and erase, each of the last two behind a confirmation page.

The same library as ``mailer subscribers`` (``store``, ``personal``); every change records the
staff member (``by``) in the audit trail.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mailer.console.context import CONSOLE_HEADERS, Console
from mailer.console.guard import StaffMember
from mailer.console.inputs import fetch_page, last_page, path_id
from mailer.console.records_common import PER_PAGE, problem
from mailer.console.wording import sentence
from mailer.db import audit
from mailer.db.schema import SUBSCRIBER_STATUSES
from mailer.errors import DatabaseUnavailable, MailerError
from mailer.subscribers import personal, store

SECTION = "subscribers"
MAX_QUERY = 320  # an address at most


@dataclass(frozen=True)
class Event:
    """One line of a person's audit trail, for the record page."""

    kind: str
    at: datetime
    detail: tuple[tuple[str, str], ...]


def _events(data: dict[str, Any]) -> list[Event]:
    """The export's events (oldest first, ISO times), newest first for the page."""
    found = []
    for item in reversed(data.get("events", [])):
        detail = item.get("detail") or {}
        pairs = tuple(
            (str(key), ", ".join(map(str, value)) if isinstance(value, list) else str(value))
            for key, value in (detail.items() if isinstance(detail, dict) else [])
        )
        found.append(Event(str(item["kind"]), datetime.fromisoformat(item["at"]), pairs))
    return found


def _paused_until(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


class SubscriberPages:
    """The views; each starts with the guard (role admin)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.web = console.web

    def _gone(self, request: Request, member: StaffMember, text: str) -> Response:
        return problem(
            self.console,
            request,
            member,
            status=404,
            title="No such subscriber",
            text=text,
            section=SECTION,
            back=("Search subscribers", self.console.pages.url("/subscribers")),
        )

    async def _subscriber(
        self, request: Request, member: StaffMember
    ) -> store.Subscriber | Response:
        sid = path_id(request, "record_id")
        if sid is None:
            return self._gone(request, member, "That is not a subscriber's id.")
        try:
            return await run_in_threadpool(store.get_by_id, self.web.engine, sid)
        except DatabaseUnavailable:
            raise  # the app's 503 page: an outage is not a missing subscriber
        except MailerError as exc:
            return self._gone(request, member, sentence(exc))

    async def search(self, request: Request) -> Response:
        """``GET /staff/subscribers?q=&status=&page=``: by address or name, any case."""
        member = await self.console.guard.page(request, "admin")
        query = request.query_params.get("q", "")[:MAX_QUERY]
        status = request.query_params.get("status") or None
        if status not in (None, *SUBSCRIBER_STATUSES):
            status = None
        engine = self.web.engine

        def search(page: int) -> store.Found:
            return store.search(
                engine, query, status=status, limit=PER_PAGE, offset=(page - 1) * PER_PAGE
            )

        page, found = await fetch_page(request, search, PER_PAGE)
        return self.console.render(
            request,
            "subscribers.html",
            member,
            section=SECTION,
            query=query,
            chosen_status=status or "",
            statuses=SUBSCRIBER_STATUSES,
            found=found,
            page=page,
            pages=last_page(found.total, PER_PAGE),
        )

    async def record(self, request: Request) -> Response:
        """``GET /staff/subscribers/{id}``: status, topics, digests, consent, events, mail."""
        member = await self.console.guard.page(request, "admin")
        sub = await self._subscriber(request, member)
        if isinstance(sub, Response):
            return sub
        data = await run_in_threadpool(personal.export, self.web.engine, sub.uid)
        if data is None:  # erased between the two reads
            return self._gone(request, member, "This subscriber was erased a moment ago.")
        names = {d.key: d.name for d in self.web.settings.digests}
        topic_names = dict(self.web.topic_choices)
        deliveries = data["deliveries"]
        return self.console.render(
            request,
            "subscriber.html",
            member,
            section=SECTION,
            sub=sub,
            now=self.web.clock(),
            topic_names=topic_names,
            digest_names=names,
            digests=[
                {
                    "key": d["digest"],
                    "name": names.get(d["digest"]),
                    "chosen_at": datetime.fromisoformat(d["chosen_at"]),
                    "choice": sub.choice(d["digest"]),
                    "paused_until": _paused_until(d["paused_until"]),
                }
                for d in data["digests"]
            ],
            consent=data["consent"],
            events=_events(data),
            delivered=len(deliveries),
            sent=sum(1 for d in deliveries if d["status"] == "sent"),
            bounce_count=data["subscriber"]["bounce_count"],
        )

    async def export(self, request: Request) -> Response:
        """``POST /staff/subscribers/{id}/export``: the person's data, the JSON they would
        download themselves (``personal.document``); recorded with who asked."""
        member, _ = await self.console.guard.action(request, "admin")
        sub = await self._subscriber(request, member)
        if isinstance(sub, Response):
            return sub
        web = self.web
        now = web.clock()

        def export() -> str | None:
            body = personal.document(
                web.engine,
                sub.uid,
                newsletter=web.settings.site.name,
                publisher=web.settings.site.publisher,
                now=now,
            )
            if body is not None:
                with web.engine.begin() as conn:
                    audit.record(
                        conn,
                        None,
                        "staff.subscriber_exported",
                        now,
                        subscriber=sub.id,
                        by=member.by,
                    )
            return body

        body = await run_in_threadpool(export)
        if body is None:
            return self._gone(request, member, "This subscriber was erased a moment ago.")
        return Response(
            body,
            media_type="application/json",
            headers={
                **CONSOLE_HEADERS,
                "Content-Disposition": f'attachment; filename="subscriber-{sub.id}.json"',
            },
        )

    async def _confirm_page(self, request: Request, what: str) -> Response:
        """The page before ``what`` (unsubscribe, erase): what it does, and the button."""
        member = await self.console.guard.page(request, "admin")
        sub = await self._subscriber(request, member)
        if isinstance(sub, Response):
            return sub
        return self.console.render(
            request, "subscriber_confirm.html", member, section=SECTION, sub=sub, what=what
        )

    async def unsubscribe_page(self, request: Request) -> Response:
        """``GET /staff/subscribers/{id}/unsubscribe``: what it does, and the button."""
        return await self._confirm_page(request, "unsubscribe")

    async def unsubscribe(self, request: Request) -> Response:
        """``POST``: unsubscribe them now, as ``mailer subscribers remove`` (the record stays)."""
        member, _ = await self.console.guard.action(request, "admin")
        sub = await self._subscriber(request, member)
        if isinstance(sub, Response):
            return sub
        path = f"/subscribers/{sub.id}"
        if sub.status == "unsubscribed":
            return self.console.redirect(
                path, notice=f"Subscriber {sub.id} was already unsubscribed.", member=member
            )
        try:
            await run_in_threadpool(
                lambda: store.set_status(
                    self.web.engine,
                    sub.email,
                    "unsubscribed",
                    now=self.web.clock(),
                    source="staff",
                    by=member.by,
                )
            )
        except DatabaseUnavailable:
            raise  # the app's 503 page: an outage is not a missing subscriber
        except MailerError as exc:
            return self._gone(request, member, sentence(exc))
        # No address in the notice: it travels in a URL (history, server logs).
        return self.console.redirect(
            path,
            notice=f"Subscriber {sub.id} is unsubscribed: no further issue goes to them.",
            member=member,
        )

    async def erase_page(self, request: Request) -> Response:
        """``GET /staff/subscribers/{id}/erase``: what goes, what stays, and the button."""
        return await self._confirm_page(request, "erase")

    async def erase(self, request: Request) -> Response:
        """``POST``: erase everything about them, as ``mailer subscribers erase``; the hash of
        the address stays on the suppression list."""
        member, _ = await self.console.guard.action(request, "admin")
        sub = await self._subscriber(request, member)
        if isinstance(sub, Response):
            return sub
        try:
            await run_in_threadpool(
                lambda: personal.erase(
                    self.web.engine, sub.email, now=self.web.clock(), by=member.by
                )
            )
        except DatabaseUnavailable:
            raise  # the app's 503 page: an outage is not a missing subscriber
        except MailerError as exc:
            return self._gone(request, member, sentence(exc))
        # No address in the notice: it travels in a URL, and the address is what was erased.
        return self.console.redirect(
            "/subscribers",
            notice=f"Subscriber {sub.id} erased. Only a one-way hash of the address stays, on"
            " the suppression list, so it is never mailed again.",
            member=member,
        )


def routes(console: Console) -> list[Route]:
    views = SubscriberPages(console)
    one = "/subscribers/{record_id}"
    return [
        Route("/subscribers", views.search, methods=["GET"]),
        Route(one, views.record, methods=["GET"]),
        Route(one + "/export", views.export, methods=["POST"]),
        Route(one + "/unsubscribe", views.unsubscribe_page, methods=["GET"]),
        Route(one + "/unsubscribe", views.unsubscribe, methods=["POST"]),
        Route(one + "/erase", views.erase_page, methods=["GET"]),
        Route(one + "/erase", views.erase, methods=["POST"]),
    ]
