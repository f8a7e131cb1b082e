"""The staff console in tests: an app, a staff account and a logged-in client.

``staff_client`` opens a session the way a login does (``sessions.open_session``) and hands
back a TestClient that carries its cookie over HTTPS (the cookie is ``Secure``), plus the
session's CSRF token for the forms a test posts.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from starlette.applications import Starlette
from starlette.testclient import TestClient

from mailer.console import sessions
from mailer.db.schema import deliveries, issues, staff_accounts
from mailer.web import Limits, SmtpConfirmationSender, create_app
from tests.factories import Clock, make_settings

BASE = "https://testserver"


@dataclass
class StaffClient:
    """A TestClient logged in as one staff account."""

    client: TestClient
    account_id: int
    email: str
    csrf: str

    def post(self, path: str, data: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """A console form post with this session's CSRF token."""
        return self.client.post(
            path, data={"csrf": self.csrf, **(data or {})}, follow_redirects=False, **kwargs
        )

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, follow_redirects=False, **kwargs)


def add_account(
    engine: sa.Engine, email: str, role: str = "editor", *, now: datetime, password_hash: str = ""
) -> int:
    """A staff account row (a password hash only if given)."""
    with engine.begin() as conn:
        account_id: int = conn.execute(
            staff_accounts.insert()
            .values(email=email, role=role, created_at=now, password_hash=password_hash or None)
            .returning(staff_accounts.c.id)
        ).scalar_one()
    return account_id


def staff_client(
    app: Starlette,
    engine: sa.Engine,
    *,
    now: datetime,
    role: str = "editor",
    email: str | None = None,
    rules: sessions.Rules | None = None,
) -> StaffClient:
    """A client logged in as a new account of ``role`` (``email`` defaults by role)."""
    email = email or f"{role}@news.example.org"
    account_id = add_account(engine, email, role, now=now)
    with engine.begin() as conn:
        session_id = sessions.open_session(
            conn, account_id, now=now, rules=rules or sessions.Rules(), ip="127.0.0.1"
        )
        csrf = conn.scalar(
            sa.select(sessions.staff_sessions.c.csrf).where(
                sessions.staff_sessions.c.account_id == account_id
            )
        )
    secret = app.state.web.settings.site.require_secret()
    client = TestClient(app, base_url=BASE)
    # No domain: the cookie jar files a dotless host as "testserver.local", so a cookie set
    # for domain "testserver" would never be sent.
    client.cookies.set(sessions.COOKIE_NAME, sessions.cookie_value(secret, session_id))
    return StaffClient(client, account_id, email, str(csrf))


def make_app(engine: sa.Engine, db_url: str, clock: Clock, **limits: Any) -> Starlette:
    """The web app with its console over ``engine``, on ``clock``, with login ``limits``
    (``Limits`` fields) if given."""
    settings = make_settings(db_url)
    return create_app(
        settings, engine, SmtpConfirmationSender(settings), clock=clock, limits=Limits(**limits)
    )


def mark(engine: sa.Engine, issue_id: int, status: str, count: int, at: datetime) -> None:
    """``count`` queued deliveries of the issue marked ``status`` at ``at``, as the worker
    would."""
    with engine.begin() as conn:
        ids = conn.scalars(
            sa.select(deliveries.c.id)
            .where(deliveries.c.issue_id == issue_id, deliveries.c.status == "queued")
            .order_by(deliveries.c.id)
            .limit(count)
        ).all()
        assert len(ids) == count
        conn.execute(
            deliveries.update()
            .where(deliveries.c.id.in_(ids))
            .values(status=status, sent_at=at if status == "sent" else None, updated_at=at)
        )


def status_of(engine: sa.Engine, issue_id: int) -> str:
    with engine.connect() as conn:
        return str(conn.scalar(sa.select(issues.c.status).where(issues.c.id == issue_id)))
