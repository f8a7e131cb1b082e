"""What COMPLIANCE.md asks of every message, checked on the bytes as received."""

from __future__ import annotations

import email
import email.policy
import re
from email.message import EmailMessage

from mailer.config.settings import Settings

ONE_EACH = ("From", "To", "Subject", "Date", "Message-ID", "MIME-Version")
LIST_HEADERS = ("List-Id", "List-Unsubscribe", "List-Unsubscribe-Post")


def parse(raw: bytes) -> EmailMessage:
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def header_block(raw: bytes) -> bytes:
    return raw[: raw.index(b"\r\n\r\n") + 2]


def raw_field(raw: bytes, name: str) -> bytes:
    """One header field as written (folds included), without its name."""
    match = re.search(
        rb"^" + name.encode() + rb": (.*?)\r\n(?![ \t])", header_block(raw), re.M | re.S | re.I
    )
    assert match, name
    return match.group(1)


def assert_compliant(raw: bytes, settings: Settings, *, list_mail: bool = True) -> EmailMessage:
    """Every COMPLIANCE.md format rule that a message's bytes can prove."""
    # RFC 5322 §2.3: CRLF only, no bare CR or LF anywhere.
    assert b"\r" not in raw.replace(b"\r\n", b"") and b"\n" not in raw.replace(b"\r\n", b"")
    head, body = header_block(raw), raw[len(header_block(raw)) :]
    assert head.isascii()
    for line in head.split(b"\r\n"):
        assert len(line) <= 998  # RFC 5322 §2.1.1 MUST
        if not line.startswith((b"To:", b"List-Unsubscribe:", b" <mailto:", b"Message-ID:")):
            assert len(line) <= 78, line  # SHOULD; the exceptions cannot be folded
    for line in body.split(b"\r\n"):
        assert len(line) <= 76, line  # RFC 2045 §6.7 (QP) and every boundary line
    assert body.isascii()
    for word in re.findall(rb"=\?[^?]+\?[bBqQ]\?[^?]*\?=", head):
        assert len(word) <= 75  # RFC 2047 §2
    msg = parse(raw)
    for name in ONE_EACH + (LIST_HEADERS if list_mail else ()):
        assert len(msg.get_all(name) or []) == 1, name
    domain = "@" + settings.site.domain + ">"
    assert str(msg["Message-ID"]).endswith(domain)
    assert settings.site.domain in str(msg["From"])
    assert msg["MIME-Version"] == "1.0"
    assert msg["Auto-Submitted"] == "auto-generated"
    assert msg.get_content_type() == "multipart/alternative"
    body_parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in body_parts] == ["text/plain", "text/html"]
    for part in body_parts:
        assert part.get_content_charset() == "utf-8"
        assert part["Content-Transfer-Encoding"] == "quoted-printable"
    text, html = (p.get_content() for p in body_parts)
    for needle in (settings.site.privacy_policy_url, settings.site.postal_address):
        assert needle in text and needle in html
    if list_mail:
        assert_list_headers(raw, msg, settings, text, html)
    else:
        assert msg["List-Unsubscribe"] is None
    return msg


def assert_list_headers(
    raw: bytes, msg: EmailMessage, settings: Settings, text: str, html: str
) -> None:
    unsubscribe = raw_field(raw, "List-Unsubscribe")
    assert b"=?" not in unsubscribe  # never RFC 2047-encoded (COMPLIANCE pitfall 1)
    unfolded = unsubscribe.replace(b"\r\n", b"").decode()
    urls = re.findall(r"<([^<>\s]+)>", unfolded)
    assert ", ".join(f"<{u}>" for u in urls) == unfolded  # RFC 2369 §2: nothing else
    https = [u for u in urls if u.startswith("https://")]
    assert len(https) == 1 and https[0].startswith(settings.site.base_url + "/unsubscribe/")
    token = https[0].rsplit("/", 1)[1]
    if settings.site.unsubscribe_mailto:
        assert urls[1:] == [
            f"mailto:{settings.site.unsubscribe_mailto}?subject=unsubscribe-{token}"
        ]
        assert unsubscribe.count(b"\r\n") == 1 and b",\r\n <mailto:" in unsubscribe
    else:
        assert urls == https
    assert raw_field(raw, "List-Unsubscribe-Post") == b"List-Unsubscribe=One-Click"
    assert str(msg["List-Id"]).endswith(f"<{settings.site.list_id}>")
    preferences = https[0].replace("/unsubscribe/", "/preferences/").rsplit(".", 1)[0]
    for part in (text, html):
        assert https[0] in part
        assert preferences + "." in part
