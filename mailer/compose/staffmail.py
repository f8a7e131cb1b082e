"""Mail to staff as bytes: transactional, from the site's address, with no List-* headers.

A test copy of a digest is built by ``mailer.compose.testcopy.build_test_copy``; everything
else staff get (review mails, reports, alerts) is a subject and a text part, with an HTML part
where one helps, built here with the same header rules as every other message.
"""

from __future__ import annotations

import html as html_lib
import secrets
from datetime import datetime
from email.message import EmailMessage

from mailer.compose.messages import (
    POLICY,
    PersonalHeaders,
    add_headers,
    attach_parts,
    check_address,
    date_value,
)
from mailer.config.settings import Settings


def staff_message_id(settings: Settings, kind: str) -> str:
    """A fresh Message-ID on the site's domain for one staff mail."""
    return f"<staff.{kind}.{secrets.token_hex(12)}@{settings.site.domain}>"


def build_staff_message(
    settings: Settings,
    *,
    to: str,
    subject: str,
    text: str,
    html: str | None,
    message_id: str,
    now: datetime,
) -> bytes:
    """The RFC 5322 bytes (CRLF) of one staff mail to ``to``: text/plain, or
    multipart/alternative when ``html`` is given; quoted-printable, UTF-8."""
    text, html = _with_footer(settings, text, html)
    msg = EmailMessage(policy=POLICY)
    personal = PersonalHeaders(
        to=check_address(to), date=date_value(now), message_id=message_id, list_unsubscribe=None
    )
    add_headers(msg, settings, subject, personal, raw=False, list_headers=False)
    if html is None:
        msg.set_content(text, cte="quoted-printable")
    else:
        attach_parts(msg, text, html)
    return msg.as_bytes()


def _with_footer(settings: Settings, text: str, html: str | None) -> tuple[str, str | None]:
    """Both parts end with the sender's name, postal address and privacy policy, as every
    message from the site does (COMPLIANCE.md), staff mail included."""
    site = settings.site
    lines = (
        site.name,
        *site.postal_address.splitlines(),
        f"Privacy policy: {site.privacy_policy_url}",
    )
    text = text.rstrip("\n") + "\n\n-- \n" + "\n".join(lines) + "\n"
    if html is not None:
        shown = "<br>".join(html_lib.escape(line) for line in lines[:-1])
        url = html_lib.escape(site.privacy_policy_url)
        footer = (
            '<hr><p style="font-size:12px;color:#555">'
            f'{shown}<br><a href="{url}">Privacy policy</a></p>'
        )
        # Inside the body of a whole page (the review mail carries the digest's), else after.
        end = html.lower().rfind("</body>")
        html = html[:end] + footer + html[end:] if end >= 0 else html + footer
    return text, html
