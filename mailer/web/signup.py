"""Joining: the sign-up page, the form post (double opt-in), the confirmation page and its
button, the confirmed page and the welcome mail that follows it, the embed.

The answer to a valid sign-up is the same page whatever the address's state (new, pending,
active, unsubscribed, suppressed), and the confirmation mail goes out after the response, so
that neither the page nor its timing tells anyone whether an address is on the list.
"""

from __future__ import annotations

import logging

from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from mailer.compose.messages import build_confirmation
from mailer.compose.welcome import Welcome
from mailer.db.engine import reading
from mailer.delivery.policy import Outcome
from mailer.errors import MailerError
from mailer.logs import describe_error, operational_errors
from mailer.models import Recipient
from mailer.subscribers import editions, lifecycle, store, welcome_mail
from mailer.subscribers.tokens import Purpose, make_token
from mailer.subscribers.welcome import welcome_for
from mailer.web.context import NO_STORE, WebContext, client_ip, read_form, user_agent
from mailer.web.forms import (
    DIGESTS_SHOWN,
    HONEYPOT,
    MAX_EMAIL,
    Invalid,
    consent_source,
    parse_signup,
)
from mailer.web.security import page_csp

log = logging.getLogger(__name__)


class SignupViews:
    """The sign-up form (its page, and the snippet that embeds it in the site), what follows it (the
    confirmation mail) and the confirmation link."""

    def __init__(self, web: WebContext) -> None:
        self.web = web

    async def home(self, request: Request) -> Response:
        """The sign-up form; ``?email=`` (from an archived issue's sign-up box) fills in the
        address, nothing else: the topics, digests and the consent box are the reader's to
        choose."""
        email = request.query_params.get("email", "").strip()[:MAX_EMAIL]
        return self.web.pages.render(
            "signup.html",
            errors=[],
            values={"email": email} if email else {},
            honeypot=HONEYPOT,
            digests_shown=DIGESTS_SHOWN,
        )

    async def embed(self, request: Request) -> Response:
        return self.web.pages.render(
            "embed_page.html",
            snippet=self.web.pages.embed_snippet,
            headers={"Content-Security-Policy": page_csp(self.web.image_origin, script=True)},
        )

    def _too_many(self, retry_after: int) -> Response:
        return self.web.pages.error(
            429,
            "Too many sign-up attempts. Please wait a few minutes and try again.",
            headers={"Retry-After": str(retry_after)},
        )

    async def subscribe(self, request: Request) -> Response:
        web = self.web
        ip = client_ip(request) or "unknown"
        if not web.per_ip.hit(ip):
            log.info("sign-up rate limit (IP)", extra={"ip": ip})
            return self._too_many(web.per_ip.retry_after(ip))
        form = await read_form(request)
        try:
            signup = parse_signup(form, web.topic_choices, web.offered_digests)
        except Invalid as exc:
            values = {
                "email": next((v for v in form.getlist("email") if isinstance(v, str)), "")[:320],
                "topics": [v for v in form.getlist("topic") if isinstance(v, str)],
                "digests": [v for v in form.getlist("digest") if isinstance(v, str)],
                "consent": False,
            }
            return web.pages.render(
                "signup.html",
                status=400,
                errors=exc.errors,
                values=values,
                honeypot=HONEYPOT,
                digests_shown=DIGESTS_SHOWN,
            )
        if not web.per_address.hit(signup.email):
            log.info("sign-up rate limit (address)")
            return self._too_many(web.per_address.retry_after(signup.email))
        consent = lifecycle.Consent(
            source=consent_source(signup.source, request.headers.get("referer")),
            ip=client_ip(request),
            user_agent=user_agent(request),
            policy_version=web.settings.site.privacy_policy_version,
        )
        recipient = await run_in_threadpool(
            lifecycle.record_signup,
            web.engine,
            signup.email,
            signup.topics,
            consent,
            editions.defaults(web.settings.digests) if signup.digests is None else signup.digests,
            now=web.clock(),
            domain=web.settings.site.domain,
            daily_cap=web.limits.confirmations_per_day,
        )
        task = BackgroundTask(self.send_confirmation, recipient) if recipient else None
        return web.pages.render(
            "check_inbox.html", headers=NO_STORE, background=task, email=signup.email
        )

    async def send_confirmation(self, recipient: Recipient) -> None:
        """Build and send the double opt-in mail; a failure is logged and recorded, not raised
        (the response has gone; the person can submit the form again)."""
        web = self.web
        try:
            message = build_confirmation(
                web.settings, recipient, web.clock(), renderer=web.renderer
            )
            result = await web.sender.send(recipient, message)
        except (MailerError, OSError) as exc:
            log.error("cannot send a confirmation mail: %s", exc)
            reply = str(exc)
        else:
            if result.outcome is Outcome.SENT:
                return
            log.warning(
                "confirmation mail not accepted",
                extra={"outcome": result.outcome.value, "code": result.code, "reply": result.reply},
            )
            reply = f"{result.outcome.value}: {result.code or ''} {result.reply}"
        expected: tuple[type[Exception], ...] = (MailerError, *operational_errors())
        try:
            await run_in_threadpool(
                lifecycle.record_send_failure,
                web.engine,
                recipient.uid,
                recipient.message_id,
                reply,
                now=web.clock(),
            )
        except expected as exc:
            # The database went too (DatabaseUnavailable is a MailerError): one line, as above.
            log.error(
                "cannot record the failed confirmation mail to %s: %s",
                recipient.email,
                describe_error(exc),
            )

    async def confirm_page(self, request: Request) -> Response:
        """GET: what confirming means, and one button that POSTs to the same URL.

        Reads only: mail scanners (Safe Links, corporate gateways) fetch every link in a
        message, so a GET that confirmed would let a scanner give consent its owner never gave.
        """
        web = self.web
        token = request.path_params["token"]
        uid = web.uid(token, Purpose.CONFIRM)
        account = await run_in_threadpool(store.find, web.engine, uid)
        if account is None:
            return self._expired()
        if account.status == "active":
            return await self._welcome(account, already=True)
        if account.status != "pending":
            return self._ended()
        return web.pages.render(
            "confirm.html",
            headers=NO_STORE,
            action=web.pages.url("/confirm/" + token),
            chosen=[t for t in web.settings.topics if t.key in account.topics],
        )

    async def confirm(self, request: Request) -> Response:
        """POST: confirm, recording this request's time, IP and user agent as the evidence.

        The signed token in the URL is the capability, as for the unsubscribe and preferences
        forms: no cookie, no CSRF token, and the body is not read.
        """
        web = self.web
        uid = web.uid(request.path_params["token"], Purpose.CONFIRM)
        outcome, account = await run_in_threadpool(
            lifecycle.confirm,
            web.engine,
            uid,
            ip=client_ip(request),
            user_agent=user_agent(request),
            now=web.clock(),
        )
        if outcome is lifecycle.Confirmed.UNKNOWN or account is None:
            return self._expired()
        if outcome is lifecycle.Confirmed.INACTIVE:
            return self._ended()
        if outcome is not lifecycle.Confirmed.ACTIVATED:
            return await self._welcome(account, already=True)
        if not web.settings.welcome.enabled:
            await run_in_threadpool(welcome_mail.not_owed, web.engine, account.id, now=web.clock())
            return await self._welcome(account, already=False)
        task = BackgroundTask(self.send_welcome, account.id)
        return await self._welcome(account, already=False, background=task)

    async def send_welcome(self, subscriber_id: int) -> None:
        """The welcome mail, after the confirmed page has gone. What the relay does not accept
        stays owed and the service's staff round sends it (``welcome_mail.send_owed``); a
        database that fails here leaves it owed too, so this only logs."""
        web = self.web
        expected: tuple[type[Exception], ...] = (MailerError, *operational_errors())
        try:
            await welcome_mail.send_welcome(
                web.engine,
                web.settings,
                web.sender,
                subscriber_id,
                now=web.clock(),
                renderer=web.renderer,
            )
        except expected as exc:
            log.error("cannot send the welcome mail now: %s", describe_error(exc))

    def _expired(self) -> Response:
        return self.web.pages.message(
            "This link has expired",
            "We keep unconfirmed sign-ups for a few days only. Please sign up again: "
            "we will send you a new link.",
            status=404,
            links=(("Sign up again", self.web.pages.url("/")),),
            headers=NO_STORE,
        )

    def _ended(self) -> Response:
        return self.web.pages.message(
            "This subscription has ended",
            "You unsubscribed (or your address stopped accepting mail), so this old "
            "confirmation link changes nothing. To receive the newsletter again, sign up "
            "again.",
            links=(("Sign up again", self.web.pages.url("/")),),
            headers=NO_STORE,
        )

    async def _welcome(
        self,
        account: store.Subscriber,
        *,
        already: bool,
        background: BackgroundTask | None = None,
    ) -> Response:
        """The confirmed page: what the welcome mail says (``welcome_for``), and whether that
        mail is on its way (``background`` sends it)."""
        web = self.web
        preferences = web.pages.url(
            "/preferences/"
            + make_token(web.settings.site.require_secret(), Purpose.PREFERENCES, account.uid)
        )
        welcome = await run_in_threadpool(self._welcome_content, account.id)
        return web.pages.render(
            "welcome.html",
            headers=NO_STORE,
            background=background,
            already=already,
            mailed=background is not None,
            preferences=preferences,
            welcome=welcome,
        )

    def _welcome_content(self, subscriber_id: int) -> Welcome:
        with reading(self.web.engine) as conn:
            return welcome_for(conn, self.web.settings, subscriber_id, now=self.web.clock())
