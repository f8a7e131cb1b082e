"""The link holder's pages: unsubscribe (RFC 8058 one-click), preferences, data export, erasure.

The signed token in the URL is the capability (RFC 8058 §3.1: the URI alone identifies the
recipient): no login, no cookie, no CSRF token. Every change is a POST, and every answer is
a page, never a redirect (RFC 8058 §3.1 forbids one for the unsubscribe POST).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response

from mailer.config.settings import Digest
from mailer.subscribers import lifecycle, personal, store
from mailer.subscribers.editions import UNTIL_RESUMED, Choice
from mailer.subscribers.tokens import Purpose, make_token
from mailer.web.context import NO_STORE, WebContext, read_form
from mailer.web.forms import (
    EVERY_DIGEST,
    PAUSE_DAYS,
    FieldError,
    Invalid,
    parse_delete,
    parse_preferences,
)
from mailer.web.pages import mask_address


@dataclass(frozen=True)
class EditionView:
    """One digest on the preferences page: the config's entry and the reader's choice of it."""

    digest: Digest
    choice: Choice | None

    @property
    def key(self) -> str:
        return self.digest.key

    @property
    def chosen(self) -> bool:
        return self.choice is not None

    def paused(self, now: datetime) -> bool:
        return self.choice is not None and self.choice.paused(now)


class AccountViews:
    """The pages a link holder uses: unsubscribe (one-click included), preferences and pause,
    export of their data, deletion."""

    def __init__(self, web: WebContext) -> None:
        self.web = web

    def _token(self, purpose: Purpose, uid: str) -> str:
        return make_token(self.web.settings.site.require_secret(), purpose, uid)

    def _links(self, uid: str) -> dict[str, str]:
        url = self.web.pages.url
        preferences = url("/preferences/" + self._token(Purpose.PREFERENCES, uid))
        return {
            "preferences": preferences,
            "unsubscribe": url("/unsubscribe/" + self._token(Purpose.UNSUBSCRIBE, uid)),
            "export": preferences + "/export",
            "delete": preferences + "/delete",
        }

    def _not_found(self) -> Response:
        return self.web.pages.message(
            "We hold nothing for this link",
            "There is no subscription for this link any more: it was deleted, or never "
            "confirmed. You will not receive anything from us.",
            status=404,
            links=(("Sign up", self.web.pages.url("/")),),
            headers=NO_STORE,
        )

    # --- unsubscribe ----------------------------------------------------------------------

    async def unsubscribe_page(self, request: Request) -> Response:
        """GET: a page with one button. Never unsubscribes: link scanners fetch every URL."""
        web = self.web
        token = request.path_params["token"]
        uid = web.uid(token, Purpose.UNSUBSCRIBE)
        account = await run_in_threadpool(store.find, web.engine, uid)
        return web.pages.render(
            "unsubscribe.html",
            headers=NO_STORE,
            account=account,
            masked=mask_address(account.email) if account else "",
            action=web.pages.url("/unsubscribe/" + token),
            links=self._links(uid) if account else None,
        )

    async def unsubscribe(self, request: Request) -> Response:
        """POST: unsubscribe now, whatever the body (RFC 8058 one-click, or our button)."""
        web = self.web
        uid = web.uid(request.path_params["token"], Purpose.UNSUBSCRIBE)
        via = "one-click"
        try:
            form = await read_form(request)
        except HTTPException as exc:
            if exc.status_code == 413:
                raise
            # RFC 8058: the URI alone says who and what; an odd body must not stop it.
        else:
            if form.get("via") == "page":
                via = "page"
        account = await run_in_threadpool(
            lifecycle.unsubscribe, web.engine, uid, now=web.clock(), via=via
        )
        return web.pages.render(
            "unsubscribed.html",
            headers=NO_STORE,
            account=account,
            links=self._links(uid) if account else None,
        )

    # --- preferences ----------------------------------------------------------------------

    def _preferences(
        self,
        account: store.Subscriber,
        *,
        status: int = 200,
        saved: str = "",
        errors: list[FieldError] | None = None,
    ) -> Response:
        now = self.web.clock()
        shown = self._editions(account)
        chosen = [e for e in shown if e.chosen]
        return self.web.pages.render(
            "preferences.html",
            status=status,
            headers=NO_STORE,
            account=account,
            editions=shown,
            paused=bool(chosen) and all(e.paused(now) for e in chosen),
            pause_days=PAUSE_DAYS,
            until_resumed=UNTIL_RESUMED,
            every_digest=EVERY_DIGEST,
            now=now,
            saved=saved,
            errors=errors or [],
            links=self._links(account.uid),
        )

    def _editions(self, account: store.Subscriber) -> list[EditionView]:
        """The digests the page shows: the public ones and any other the reader receives."""
        shown = []
        for digest in self.web.settings.digests:
            choice = account.choice(digest.key)
            if digest.public or choice is not None:
                shown.append(EditionView(digest, choice))
        return shown

    async def preferences_page(self, request: Request) -> Response:
        web = self.web
        uid = web.uid(request.path_params["token"], Purpose.PREFERENCES)
        account = await run_in_threadpool(store.find, web.engine, uid)
        if account is None:
            return self._not_found()
        return self._preferences(account)

    async def preferences(self, request: Request) -> Response:
        web = self.web
        uid = web.uid(request.path_params["token"], Purpose.PREFERENCES)
        form = await read_form(request)
        account = await run_in_threadpool(store.find, web.engine, uid)
        if account is None:
            return self._not_found()
        try:
            offered = tuple(e.key for e in self._editions(account))
            change = parse_preferences(form, web.topic_choices, offered)
        except Invalid as exc:
            return self._preferences(account, status=400, errors=list(exc.errors))
        now = web.clock()
        names = dict(web.topic_choices)
        if change.action == "leave":
            updated = await run_in_threadpool(
                lifecycle.unsubscribe, web.engine, uid, now=now, via="preferences"
            )
            return self._preferences(updated or account, saved="You are unsubscribed.")
        if account.status not in lifecycle.LEAVABLE:
            return self._preferences(
                account,
                status=409,
                errors=[
                    FieldError(
                        "action",
                        "You are unsubscribed, so there is nothing to change. "
                        "To receive the newsletter again, sign up again.",
                    )
                ],
            )
        if change.action == "topics":
            updated = await run_in_threadpool(
                lifecycle.set_topics, web.engine, uid, change.topics, now=now
            )
            saved = "Saved. You will get: " + ", ".join(names[t] for t in change.topics) + "."
        elif change.action == "drop-topic":
            topic = change.topics[0]
            updated, left = await run_in_threadpool(
                lifecycle.drop_topic, web.engine, uid, topic, now=now
            )
            saved = (
                "That was your last topic, so you are now unsubscribed from "
                f"{web.settings.site.name}."
                if left
                else f"You will get no more {names[topic]}."
            )
        elif change.action == "digests":
            updated = await run_in_threadpool(
                lifecycle.set_digests, web.engine, uid, change.digests, now=now
            )
            digest_names = [web.settings.digest(k).name for k in change.digests]
            saved = "Saved. You will get: " + ", ".join(digest_names) + "."
        elif change.action == "pause":
            until = now + timedelta(days=change.days) if change.days else UNTIL_RESUMED
            which = change.digests or None
            updated = await run_in_threadpool(
                lifecycle.pause, web.engine, uid, which, until, now=now
            )
            what = web.settings.digest(change.digests[0]).name if change.digests else "Everything"
            if change.days:
                local = until.astimezone(ZoneInfo(web.settings.site.timezone))
                saved = f"{what}: paused for {change.days} days, until {local.day} {local:%B %Y}."
            else:
                saved = f"{what}: paused until you resume it."
        else:  # resume
            which = change.digests or None
            updated = await run_in_threadpool(
                lifecycle.pause, web.engine, uid, which, None, now=now
            )
            saved = (
                f"Resumed: you will get the next {web.settings.digest(change.digests[0]).name}."
                if change.digests
                else "Resumed: you will get the next issue of each of your emails."
            )
        return self._preferences(updated or account, saved=saved)

    # --- your data ------------------------------------------------------------------------

    async def export(self, request: Request) -> Response:
        """POST: everything we hold about the subscriber, as a JSON download (GDPR Art. 15, 20)."""
        web = self.web
        uid = web.uid(request.path_params["token"], Purpose.PREFERENCES)
        body = await run_in_threadpool(
            lambda: personal.document(
                web.engine,
                uid,
                newsletter=web.settings.site.name,
                publisher=web.settings.site.publisher,
                now=web.clock(),
            )
        )
        if body is None:
            return self._not_found()
        return Response(
            body,
            media_type="application/json",
            headers={
                **NO_STORE,
                "Content-Disposition": 'attachment; filename="my-newsletter-data.json"',
            },
        )

    async def delete_page(self, request: Request) -> Response:
        web = self.web
        token = request.path_params["token"]
        uid = web.uid(token, Purpose.PREFERENCES)
        account = await run_in_threadpool(store.find, web.engine, uid)
        if account is None:
            return self._not_found()
        return web.pages.render(
            "delete.html", headers=NO_STORE, errors=[], links=self._links(uid), account=account
        )

    async def delete(self, request: Request) -> Response:
        """POST with the box ticked: erase, as ``mailer subscribers erase`` (GDPR Art. 17)."""
        web = self.web
        uid = web.uid(request.path_params["token"], Purpose.PREFERENCES)
        form = await read_form(request)
        account = await run_in_threadpool(store.find, web.engine, uid)
        if account is None:
            return self._not_found()
        try:
            parse_delete(form)
        except Invalid as exc:
            return web.pages.render(
                "delete.html",
                status=400,
                headers=NO_STORE,
                errors=exc.errors,
                links=self._links(uid),
                account=account,
            )
        await run_in_threadpool(personal.erase_by_uid, web.engine, uid, now=web.clock())
        return web.pages.message(
            "Your data has been deleted",
            "We deleted your subscription, your choices and their history. We keep only a "
            "one-way fingerprint of your address so that we never email it again.",
            headers=NO_STORE,
        )
