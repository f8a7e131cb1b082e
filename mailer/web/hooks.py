"""``POST /hooks/articles``: the site's CMS pushes one article the moment it is published.

Machine to machine: no cookie, no form, no CSRF token. What proves the sender is the
signature, ``X-Mailer-Signature: sha256=<hex>``, an HMAC-SHA256 of the raw body under the
secret named by ``[hooks].secret_env`` (or ``secret_file``), compared in constant time. The
body is read up to ``[hooks].max_body_bytes`` and no further, then checked, then parsed; only
a signed body is parsed.

Storing goes the way every article goes (``mailer.content.store``), by guid: the same body
posted again is "unchanged" and changes nothing, so a replayed request is harmless, and the
site may retry a post whose answer it did not see.

Answers are JSON: 201 added, 200 updated or unchanged, with the article's id; 400 naming the
field; 401 for a missing or wrong signature; 409 when another guid holds the same story; 413
over the size cap; 503 without a secret. Every refusal changes nothing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from mailer.content.pushed import PushError, parse_pushed
from mailer.content.store import store_one
from mailer.web.context import NO_STORE, WebContext, client_ip
from mailer.web.ratelimit import RateLimiter
from mailer.web.signatures import signed_by

log = logging.getLogger(__name__)

HOOK_PATH = "/hooks/articles"
SIGNATURE_HEADER = "X-Mailer-Signature"
SIGNATURE_PREFIX = "sha256="
# Refused signatures from one client address: past this many in the window, further ones are
# answered 429 and not logged, so that a misconfigured or hostile client cannot fill the log.
FAILURES_PER_IP = 20
FAILURES_WINDOW = 600.0  # seconds


def sign(secret: bytes, body: bytes) -> str:
    """The ``X-Mailer-Signature`` value for ``body``: what the site's CMS sends."""
    return SIGNATURE_PREFIX + hmac.new(secret, body, hashlib.sha256).hexdigest()


def signature_ok(secret: bytes, body: bytes, header: str | None) -> bool:
    """True if ``header`` is ``sha256=`` and the body's HMAC under ``secret``; constant time."""
    return signed_by(secret, body, header, {"sha256": hashlib.sha256})


def _answer(status: int, **content: object) -> JSONResponse:
    return JSONResponse(content, status_code=status, headers=NO_STORE)


class HookViews:
    """The push route: read with a cap, verify, parse, store, answer."""

    def __init__(self, web: WebContext) -> None:
        self.web = web
        self.failures = RateLimiter(FAILURES_PER_IP, FAILURES_WINDOW)

    async def articles(self, request: Request) -> Response:
        hooks = self.web.settings.hooks
        if hooks.secret is None:
            return _answer(503, error="hooks are not configured")
        body = await read_capped(request, hooks.max_body_bytes)
        if body is None:
            return _answer(
                413,
                error=f"the body is over {hooks.max_body_bytes:,} bytes ([hooks].max_body_bytes)",
            )
        if not signature_ok(hooks.secret, body, request.headers.get(SIGNATURE_HEADER)):
            ip = client_ip(request) or "unknown"
            if not self.failures.hit(ip):
                return Response(
                    status_code=429,
                    headers={"Retry-After": str(self.failures.retry_after(ip)), **NO_STORE},
                )
            log.warning("hook post refused: missing or wrong signature", extra={"ip": ip})
            return _answer(401, error=f"missing or wrong {SIGNATURE_HEADER} signature")
        web = self.web
        try:
            item = parse_pushed(body, known_topics=web.settings.topic_keys, now=web.clock())
        except PushError as exc:
            return _answer(400, error=exc.message, field=exc.field)
        stored = await run_in_threadpool(store_one, web.engine, item, now=web.clock())
        log.info(
            "article pushed",
            extra={"guid": item.guid, "outcome": stored.outcome, "article": stored.article_id},
        )
        if stored.outcome == "duplicate":
            return _answer(
                409,
                error=f"article {stored.article_id} holds the same story under another guid",
                id=stored.article_id,
                outcome=stored.outcome,
            )
        if stored.outcome in ("added", "updated") and web.on_article is not None:
            web.on_article()
        status = 201 if stored.outcome == "added" else 200
        return _answer(status, id=stored.article_id, guid=item.guid, outcome=stored.outcome)


async def read_capped(request: Request, limit: int) -> bytes | None:
    """The request body, or None as soon as it is known to be over ``limit`` bytes: by its
    Content-Length before anything is read, else while reading."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                return None
        except ValueError:
            return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)
