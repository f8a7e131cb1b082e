"""The admins' Staff page: ``/staff/accounts``.

List the accounts; add one (its one-time link is shown once, on the page the POST answers, and
never put in a URL or a log); reset one (new link, password cleared, sessions ended) and remove
one, each behind a confirmation page. These call ``mailer.console.accounts``, as ``mailer staff``
does; an admin cannot remove their own account or the last admin (the library refuses both).
"""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from mailer.console import accounts
from mailer.console.context import Console
from mailer.console.guard import StaffMember
from mailer.console.inputs import path_id
from mailer.db.schema import STAFF_ROLES
from mailer.errors import AddressError, StaffAccountError


def routes(console: Console) -> list[Route]:
    views = AccountPages(console)
    return [
        Route("/accounts", views.page, methods=["GET"]),
        Route("/accounts", views.add, methods=["POST"]),
        Route("/accounts/{account_id}/reset", views.reset_page, methods=["GET"]),
        Route("/accounts/{account_id}/reset", views.reset, methods=["POST"]),
        Route("/accounts/{account_id}/remove", views.remove_page, methods=["GET"]),
        Route("/accounts/{account_id}/remove", views.remove, methods=["POST"]),
    ]


def _account_id(request: Request) -> int:
    account_id = path_id(request, "account_id")
    if account_id is None:
        raise HTTPException(404, "There is no such staff account.")
    return account_id


class AccountPages:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.web = console.web

    async def _render(
        self, request: Request, member: StaffMember, *, status: int = 200, **context: Any
    ) -> Response:
        listed = await run_in_threadpool(accounts.list_accounts, self.web.engine)
        context.setdefault("link", None)
        context.setdefault("error", None)
        context.setdefault("email", "")
        context.setdefault("role", "editor")
        response = self.console.render(
            request,
            "accounts.html",
            member,
            section="accounts",
            accounts=listed,
            roles=STAFF_ROLES,
            admins=sum(1 for a in listed if a.is_admin),
            **context,
        )
        response.status_code = status
        return response

    async def _account(self, request: Request) -> accounts.Account:
        try:
            return await run_in_threadpool(accounts.get, self.web.engine, _account_id(request))
        except StaffAccountError as exc:
            raise HTTPException(404, "There is no such staff account.") from exc

    async def page(self, request: Request) -> Response:
        member = await self.console.guard.page(request, "admin")
        return await self._render(request, member)

    def _shown(self, link: accounts.Link, what: str) -> dict[str, Any]:
        return {
            "what": what,
            "email": link.email,
            "url": accounts.link_url(self.web.settings, link.token),
            "expires_at": link.expires_at,
        }

    async def add(self, request: Request) -> Response:
        member, form = await self.console.guard.action(request, "admin")
        email = str(form.get("email") or "").strip()
        role = str(form.get("role") or "")
        try:
            link = await run_in_threadpool(
                accounts.add, self.web.engine, email, role, self.web.clock(), by=member.by
            )
        except (StaffAccountError, AddressError) as exc:
            return await self._render(
                request, member, status=400, error=str(exc), email=email, role=role
            )
        return await self._render(request, member, link=self._shown(link, "added"))

    async def reset(self, request: Request) -> Response:
        member, _ = await self.console.guard.action(request, "admin")
        account = await self._account(request)
        try:
            link = await run_in_threadpool(
                accounts.reset, self.web.engine, account.email, self.web.clock(), by=member.by
            )
        except StaffAccountError as exc:
            return await self._render(request, member, status=400, error=str(exc))
        return await self._render(request, member, link=self._shown(link, "reset"))

    async def reset_page(self, request: Request) -> Response:
        member = await self.console.guard.page(request, "admin")
        account = await self._account(request)
        return self.console.render(
            request, "account_reset.html", member, section="accounts", account=account
        )

    async def remove_page(self, request: Request) -> Response:
        member = await self.console.guard.page(request, "admin")
        account = await self._account(request)
        return self.console.render(
            request, "account_remove.html", member, section="accounts", account=account
        )

    async def remove(self, request: Request) -> Response:
        member, _ = await self.console.guard.action(request, "admin")
        account = await self._account(request)
        try:
            await run_in_threadpool(
                accounts.remove, self.web.engine, account.email, self.web.clock(), by=member.by
            )
        except StaffAccountError as exc:
            return await self._render(request, member, status=400, error=str(exc))
        return self.console.redirect(
            "/accounts",
            notice=f"Staff account {account.id} removed; its sessions have ended.",
            member=member,
        )
