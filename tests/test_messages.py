"""Message building: the spliced bytes against the slow EmailMessage oracle, and COMPLIANCE.md.

Every message is parsed back with ``email.message_from_bytes(..., policy=email.policy.default)``.
"""

from __future__ import annotations

import base64
import functools
import re
import shutil
import string
from dataclasses import replace
from datetime import UTC, datetime
from email.message import EmailMessage
from html import unescape
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.compose.messages import (
    DigestComposer,
    SplicedMessage,
    _Markers,
    build_confirmation,
    list_id_value,
    reference_message,
)
from mailer.compose.rendering import TEMPLATE_DIR, Renderer
from mailer.compose.wire import CrlfOnly, SmtpReady, has_leading_dot, is_crlf_only
from mailer.config.settings import Settings
from mailer.errors import AddressError, DeliveryError, TemplateError
from mailer.models import Article, IssueContent, Recipient
from mailer.subscribers.links import links_for
from mailer.text import one_line
from tests.compliance import assert_compliant, header_block, parse, raw_field
from tests.factories import BASE_CONFIG, NOW, TOPICS, make_settings

SETTINGS = make_settings()
RENDERER = Renderer()
SUBJECT = "Camp Lejeune & New River Updates — week of 20 November"
UID = "AAAAAAAAAAAAAAAAAAAAAA"
SEED = (
    Path(__file__).resolve().parent.parent
    / "mailer"
    / "devtools"
    / "examples"
    / "articles"
    / "000-putin-visits-india.txt"
)


def article(n: int, topic: str = "base-alerts", **overrides: Any) -> Article:
    values: dict[str, Any] = {
        "id": n,
        "guid": f"guid-{n}",
        "topic": topic,
        "title": f"Gate {n} closed for resurfacing — plan ahead",
        "summary": "The main gate closes Saturday from 0600 to 1800.\n\nUse Sneads Ferry.",
        "why_it_matters": "Expect longer lines on the way in; allow 20 extra minutes.",
        "body": "",
        "link": f"https://news.example.org/articles/{n}",
        "published_at": NOW,
    }
    values.update(overrides)
    return Article(**values)


def issue(*articles: Article, subject: str = SUBJECT) -> IssueContent:
    return IssueContent(
        issue_id=42,
        digest_key="weekly",
        digest_name="Weekly digest",
        subject=subject,
        date=NOW,
        articles=articles,
    )


# Twelve articles over three topics: a realistic ~30 KB digest.
CONTENT = issue(*(article(n, TOPICS[n % 3]) for n in range(12)))


def recipient(**overrides: Any) -> Recipient:
    values: dict[str, Any] = {
        "email": "a.b+c@example.org",
        "name": "Ann Reader",
        "uid": UID,
        "message_id": "<42.1.digest@news.example.org>",
    }
    values.update(overrides)
    return Recipient(**values)


@functools.cache
def composer(settings: Settings = SETTINGS, content: IssueContent = CONTENT) -> DigestComposer:
    return DigestComposer(settings, content, renderer=RENDERER)


def headers(msg: EmailMessage) -> list[tuple[str, str]]:
    """All headers as parsed, the random multipart boundary left out."""
    items = [(k, str(v)) for k, v in msg.items() if k != "Content-Type"]
    return [*items, ("Content-Type", msg.get_content_type())]


def parts(msg: EmailMessage) -> list[tuple[str, str | None, str, str]]:
    return [
        (
            p.get_content_type(),
            p.get_content_charset(),
            str(p["Content-Transfer-Encoding"]),
            p.get_content(),
        )
        for p in msg.iter_parts()
    ]


class StartTags(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))


def body_bytes(raw: bytes) -> bytes:
    """Everything after the top-level header block, the random boundary normalized."""
    normalized = without_boundary(raw)
    return normalized[len(header_block(normalized)) :]


def without_boundary(raw: bytes) -> bytes:
    found = re.search(rb'boundary="([^"]+)"', raw)
    assert found
    return raw.replace(found.group(1), b"BOUNDARY")


def assert_same_message(fast: bytes, slow: bytes) -> None:
    # The composer marks what it builds CRLF-only (the SMTP client then skips its own check),
    # and it is.
    assert isinstance(fast, CrlfOnly) and is_crlf_only(fast)
    # Marked ready for DATA only when no line begins with a dot (nothing to stuff).
    if isinstance(fast, SmtpReady):
        assert not has_leading_dot(fast)
    a, b = parse(fast), parse(slow)
    assert headers(a) == headers(b)
    assert parts(a) == parts(b)


# --- the splice against the oracle ------------------------------------------------------------

local_parts = st.from_regex(r"[a-z0-9]{1,20}([.+_-][a-z0-9]{1,20}){0,3}", fullmatch=True)
domains = st.sampled_from(["example.org", "mail.example.co.uk", "x-y.example", "e.org"])
uids = st.text(alphabet=string.ascii_letters + string.digits + "-_", min_size=22, max_size=22)
message_ids = st.from_regex(
    r"<[a-z0-9_-]{1,60}(\.[a-z0-9_-]{1,24}){0,3}@news\.example\.org>", fullmatch=True
)
topic_sets = st.lists(st.sampled_from([*TOPICS, "retired-topic"]), unique=True, min_size=1)
moments = st.datetimes(
    min_value=datetime(2000, 1, 1),
    max_value=datetime(2100, 1, 1),
    timezones=st.sampled_from([UTC, ZoneInfo("America/New_York"), ZoneInfo("Asia/Kolkata")]),
)


@st.composite
def recipients(draw: st.DrawFn) -> Recipient:
    return Recipient(
        email=f"{draw(local_parts)}@{draw(domains)}",
        name=draw(st.text(max_size=40)),  # never used in the message
        uid=draw(uids),
        message_id=draw(message_ids),
    )


@settings(max_examples=60, deadline=None)
@given(recipient=recipients(), topics=topic_sets, now=moments)
def test_spliced_message_equals_the_reference(
    recipient: Recipient, topics: list[str], now: datetime
) -> None:
    fast = composer().message(recipient, topics, now)
    slow = reference_message(SETTINGS, CONTENT, recipient, topics, now, renderer=RENDERER)
    if not set(topics) & set(TOPICS):
        assert fast is None and slow is None
        return
    assert fast is not None and slow is not None
    assert_same_message(fast, slow)
    # Stronger than needed, and true: b2a_qp encodes the URL lines as the email package does,
    # so the bodies are byte-identical. (Headers may fold differently: the package folds a
    # long To before the address, the splice writes it on one line; both parse the same.)
    assert body_bytes(fast) == body_bytes(slow)
    msg = assert_compliant(fast, SETTINGS)
    assert msg["To"] == recipient.email
    # Compared in UTC: an ambiguous local time (DST fold) never equals another zone's (PEP 495).
    assert msg["Date"].datetime == now.astimezone(UTC).replace(microsecond=0)
    assert msg["Message-ID"] == recipient.message_id


site_variants = st.fixed_dictionaries(
    {
        "base_url": st.sampled_from(
            ["https://news.example.org", "https://news.example.org/" + "deep/" * 40 + "x"]
        ),
        "unsubscribe_mailto": st.sampled_from(
            [None, "unsubscribe@news.example.org", "u+" + "x" * 60 + "@news.example.org"]
        ),
        "name": st.sampled_from(
            [
                "Camp Lejeune & New River Updates",
                'The "Globe" \\ Updates',
                "The Camp Lejeune and New River Air Station Community, Family and Veterans Updates",
                "Café Lejeune — Nouvelles du camp et de la rivière, édition spéciale",
            ]
        ),
        "reply_to": st.sampled_from([None, "editor@news.example.org"]),
        "feedback_id": st.sampled_from([None, "weekly:updates:examplemedia"]),
    }
)


@functools.cache
def varied(key: tuple[tuple[str, Any], ...]) -> Settings:
    """Settings with some [site] keys replaced; a None value removes the key."""
    site = dict(BASE_CONFIG["site"])
    for name, value in key:
        site[name] = value
    return make_settings(site={k: v for k, v in site.items() if v is not None})


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(site=site_variants, recipient=recipients(), subject=st.text(min_size=1, max_size=300))
def test_splice_holds_for_any_site_settings_and_subject(
    site: dict[str, Any], recipient: Recipient, subject: str
) -> None:
    data = varied(tuple(sorted(site.items())))
    content = issue(*CONTENT.articles[:3], subject=subject.strip() or "x")
    fast = DigestComposer(data, content, renderer=RENDERER).message(recipient, TOPICS, NOW)
    slow = reference_message(data, content, recipient, TOPICS, NOW, renderer=RENDERER)
    assert fast is not None and slow is not None
    assert_same_message(fast, slow)
    msg = assert_compliant(fast, data)
    assert (msg["Reply-To"] is not None) == (data.site.reply_to is not None)
    assert (msg["Feedback-ID"] is not None) == (data.site.feedback_id is not None)
    assert msg["Subject"] == one_line(content.subject)  # whitespace runs and controls cleaned


# --- single behaviours ------------------------------------------------------------------------


def test_no_article_in_the_recipients_topics_means_no_mail() -> None:
    only_alerts = issue(article(1, "base-alerts"))
    assert (
        DigestComposer(SETTINGS, only_alerts, renderer=RENDERER).message(
            recipient(), ["local-events"], NOW
        )
        is None
    )
    assert (
        reference_message(
            SETTINGS, only_alerts, recipient(), ["local-events"], NOW, renderer=RENDERER
        )
        is None
    )
    assert (
        DigestComposer(SETTINGS, only_alerts, renderer=RENDERER).message(recipient(), [], NOW)
        is None
    )


def test_recipient_sees_only_their_topics_in_configured_order() -> None:
    raw = composer().message(recipient(), ["military-news", "base-alerts"], NOW)
    assert raw is not None
    text = parts(parse(raw))[0][3]
    assert "BASE ALERTS" in text and "MILITARY NEWS" in text and "LOCAL EVENTS" not in text
    assert text.index("BASE ALERTS") < text.index("MILITARY NEWS")


def test_one_render_per_topic_set() -> None:
    class Counting(Renderer):
        calls = 0

        def render(self, name: str, context: Any) -> str:
            Counting.calls += 1
            return super().render(name, context)

    comp = DigestComposer(SETTINGS, CONTENT, renderer=Counting())
    for n in range(50):
        who = recipient(uid=f"{n:022d}", email=f"r{n}@example.org")
        comp.message(who, ["base-alerts"], NOW)
        comp.message(who, ["local-events", "base-alerts", "retired-topic"], NOW)
        comp.message(who, ["base-alerts", "local-events"], NOW)
    assert Counting.calls == 4  # two topic sets, two templates each


def test_a_realistic_digest_is_about_30_kb_and_per_recipient_urls_are_short_lines() -> None:
    raw = composer().message(recipient(), TOPICS, NOW)
    assert raw is not None
    assert 20_000 < len(raw) < 40_000
    spliced = composer().spliced(TOPICS)
    assert spliced is not None
    lines = spliced.line_sources
    assert sorted(lines) == sorted(
        ['href="{UNSUB}"', 'href="{PREFS}"', "{UNSUB}", "{PREFS}"]
    )  # each per-recipient URL alone on its line, in each part


def test_link_anywhere_in_a_long_line_is_still_spliced_exactly(tmp_path: Path) -> None:
    """A staff template may put the link mid-line, across a QP soft break: still exact."""
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATE_DIR, target)
    txt = target / "email" / "digest.txt"
    txt.write_text(
        txt.read_text(encoding="utf-8").replace(
            "Unsubscribe (one click):\n{{ links.unsubscribe }}",
            "Unsubscribe (one click) — ünïcödé — " + "x" * 50 + " {{ links.unsubscribe }} "
            "and then some more text = with equals signs and trailing space ",
        ),
        encoding="utf-8",
    )
    renderer = Renderer(target)
    comp = DigestComposer(SETTINGS, CONTENT, renderer=renderer)
    for uid in (UID, "-" * 22, "_" * 22):
        fast = comp.message(recipient(uid=uid), TOPICS, NOW)
        slow = reference_message(
            SETTINGS, CONTENT, recipient(uid=uid), TOPICS, NOW, renderer=renderer
        )
        assert fast is not None and slow is not None
        assert_same_message(fast, slow)
        assert_compliant(fast, SETTINGS)


HOSTILE = [
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "{{ 7*7 }} {% raw %}",
    "Line one\r\nBcc: victim@example.org\r\n\r\nbody",
    "Ça coûte 5 € — naïve façade 🚀",
    "W" * 5000,
    "=?utf-8?q?not=20a=20header?= =3D = \t trailing space ",
]


@pytest.mark.parametrize(
    "text", HOSTILE, ids=["script", "attr", "jinja", "crlf", "unicode", "long", "qp"]
)
def test_hostile_article_text_is_escaped_and_never_breaks_the_message(text: str) -> None:
    content = issue(
        article(1, title=text, summary=text, why_it_matters=text, link="https://e.org/" + text),
        subject=SUBJECT + " " + text,
    )
    raw = DigestComposer(SETTINGS, content, renderer=RENDERER).message(recipient(), TOPICS, NOW)
    slow = reference_message(SETTINGS, content, recipient(), TOPICS, NOW, renderer=RENDERER)
    assert raw is not None and slow is not None
    assert_same_message(raw, slow)
    msg = assert_compliant(raw, SETTINGS)
    assert msg["Bcc"] is None
    assert [k for k, _v in msg.items()].count("Subject") == 1
    assert "\n" not in str(msg["Subject"])
    html = parts(msg)[1][3]
    found = StartTags()
    found.feed(html)
    assert not {"script", "img"} & {tag for tag, _attrs in found.tags}
    assert not [name for _tag, attrs in found.tags for name, _v in attrs if name.startswith("on")]
    if "{{ 7*7 }}" in text:
        assert "{{ 7*7 }}" in html  # shown as text, never evaluated


any_text = st.text(st.characters(exclude_categories=["Cs"]), max_size=400)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(title=any_text, summary=any_text, why=any_text, link=st.one_of(st.none(), any_text))
def test_any_article_text_gives_an_exact_compliant_message(
    title: str, summary: str, why: str, link: str | None
) -> None:
    content = issue(article(1, title=title, summary=summary, why_it_matters=why, link=link))
    fast = DigestComposer(SETTINGS, content, renderer=RENDERER).message(recipient(), TOPICS, NOW)
    slow = reference_message(SETTINGS, content, recipient(), TOPICS, NOW, renderer=RENDERER)
    assert fast is not None and slow is not None
    assert_same_message(fast, slow)
    assert_compliant(fast, SETTINGS)


def test_hostile_subject_cannot_inject_headers() -> None:
    content = issue(article(1), subject="Hello\r\nBcc: victim@example.org\x00\x1b")
    raw = DigestComposer(SETTINGS, content, renderer=RENDERER).message(recipient(), TOPICS, NOW)
    assert raw is not None
    msg = parse(raw)
    assert msg["Bcc"] is None
    assert msg["Subject"] == "Hello Bcc: victim@example.org"


@pytest.mark.parametrize(
    ("field", "value", "error"),
    [
        ("email", "a@example.org\r\nBcc: b@example.org", AddressError),
        ("email", "Ann <a@example.org>", AddressError),
        ("email", "ü@example.org", AddressError),
        ("message_id", "<a@b>\r\nBcc: x", DeliveryError),
        ("message_id", "no-brackets@news.example.org", DeliveryError),
    ],
    ids=["crlf-address", "display-name", "non-ascii", "crlf-msgid", "bare-msgid"],
)
def test_recipient_values_that_could_break_headers_are_refused(
    field: str, value: str, error: type[Exception]
) -> None:
    with pytest.raises(error):
        composer().message(recipient(**{field: value}), TOPICS, NOW)


def test_naive_now_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        composer().message(recipient(), TOPICS, datetime(2026, 11, 20, 12, 0))


def test_date_is_written_in_utc() -> None:
    local = datetime(2026, 11, 20, 7, 0, tzinfo=ZoneInfo("America/New_York"))
    raw = composer().message(recipient(), TOPICS, local)
    assert raw is not None
    assert raw_field(raw, "Date") == b"Fri, 20 Nov 2026 12:00:00 +0000"


def test_list_id_phrase_is_quoted_or_encoded() -> None:
    assert list_id_value(SETTINGS.site) == (
        '"Camp Lejeune & New River Updates" <updates.news.example.org>'
    )
    accented = make_settings(site__name="Café Lejeune — Nouvelles")
    value = list_id_value(accented.site)
    assert value.startswith("=?utf-8?")
    raw = DigestComposer(accented, CONTENT, renderer=RENDERER).message(recipient(), TOPICS, NOW)
    assert raw is not None
    assert parse(raw)["List-Id"] == "Café Lejeune — Nouvelles <updates.news.example.org>"


def test_subject_with_em_dash_is_rfc2047_encoded() -> None:
    raw = composer().message(recipient(), TOPICS, NOW)
    assert raw is not None
    subject = raw_field(raw, "Subject")
    assert b"=?utf-8?" in subject and "—".encode() not in subject
    assert parse(raw)["Subject"] == SUBJECT


def test_composer_refuses_a_base_url_it_cannot_splice_safely() -> None:
    # Refused when the config loads; the composer checks again whatever settings it is given.
    odd = replace(SETTINGS, site=replace(SETTINGS.site, base_url="https://news.example.org/a'b"))
    with pytest.raises(ValueError, match="base_url"):
        DigestComposer(odd, CONTENT, renderer=RENDERER)


def test_broken_staff_template_surfaces_as_template_error(tmp_path: Path) -> None:
    target = tmp_path / "templates"
    shutil.copytree(TEMPLATE_DIR, target)
    (target / "email" / "digest.html").write_text("{{ ''.__class__.__mro__ }}", encoding="utf-8")
    comp = DigestComposer(SETTINGS, CONTENT, renderer=Renderer(target))
    with pytest.raises(TemplateError, match="unsafe"):
        comp.message(recipient(), TOPICS, NOW)


def test_message_can_be_dkim_signed_and_verified_as_is() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    raw = composer().message(recipient(), TOPICS, NOW)
    assert raw is not None
    names = [
        b"From",
        b"To",
        b"Subject",
        b"Date",
        b"Message-ID",
        b"List-Id",
        b"List-Unsubscribe",
        b"List-Unsubscribe-Post",
    ]
    signature = dkim.sign(
        raw,
        b"nl",
        b"news.example.org",
        private,
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=[n for name in names for n in (name, name)],
    )
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)

    def dns(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == b"nl._domainkey.news.example.org." else None

    assert dkim.verify(signature + raw, dnsfunc=dns, minkey=1024)


# --- the confirmation email -------------------------------------------------------------------


def test_confirmation_email() -> None:
    raw = build_confirmation(SETTINGS, recipient(), NOW, renderer=RENDERER)
    msg = assert_compliant(raw, SETTINGS, list_mail=False)
    assert msg["Subject"] == "Confirm your subscription to Camp Lejeune & New River Updates"
    assert msg["To"] == "a.b+c@example.org"
    assert msg["Message-ID"] == "<42.1.digest@news.example.org>"
    confirm = links_for(SETTINGS.site, UID).confirm
    for _type, _charset, _cte, body in parts(msg):
        flat = " ".join(unescape(body).split())
        assert confirm in body
        assert "Confirm your subscription to Camp Lejeune & New River Updates" in flat
        assert "If you did not ask to subscribe, you can ignore this email" in flat
        assert "/unsubscribe/" not in body


def test_seed_article_digest_round_trips() -> None:
    """The site's own article (a verbatim copy of the seed) as a digest, against the oracle."""
    title, _h1, summary, _h2, why, *body = SEED.read_text(encoding="utf-8").split("\n\n")
    content = issue(
        article(1, title=title, summary=summary, why_it_matters=why, body="\n\n".join(body))
    )
    fast = DigestComposer(SETTINGS, content, renderer=RENDERER).message(recipient(), TOPICS, NOW)
    slow = reference_message(SETTINGS, content, recipient(), TOPICS, NOW, renderer=RENDERER)
    assert fast is not None and slow is not None
    assert without_boundary(fast) == without_boundary(slow)


def test_a_filled_line_that_begins_with_a_dot_loses_the_ready_mark() -> None:
    markers = _Markers()
    raw = (
        b"Subject: x\r\nTo: " + markers("TO").encode() + b"\r\n\r\n"
        b"Read it: " + markers("URL").encode() + b"\r\n"
        b"The end.\r\n"
    )
    spliced = SplicedMessage(raw, markers)
    plain = spliced.fill({"TO": "a@example.org", "URL": "https://example.org/x"})
    assert isinstance(plain, SmtpReady)
    # Quoted-printable breaks the line after 75 characters: the dot then begins a line.
    url = "https://example.org/" + "x" * (75 - len("Read it: https://example.org/")) + ".y"
    dotted = spliced.fill({"TO": "a@example.org", "URL": url})
    assert b"=\r\n.y" in dotted
    assert isinstance(dotted, CrlfOnly) and not isinstance(dotted, SmtpReady)


def test_a_reader_without_the_leads_topic_gets_a_subject_for_their_own_copy() -> None:
    weekly = {
        **BASE_CONFIG["digests"][0],
        "subject": "{{ lead.title }}{% if more %}, and {{ more }} more{% endif %}",
    }
    data = make_settings(digests=[weekly])
    content = issue(
        article(1, "base-alerts"),
        article(2, "local-events", title="Holiday market Saturday"),
        article(3, "local-events", title="Turkey trot"),
        subject="Gate 1 closed for resurfacing — plan ahead, and 2 more",
    )
    composer = DigestComposer(data, content, renderer=RENDERER)
    for topics, subject in (
        (TOPICS, content.subject),  # every article: the issue's own subject
        (("local-events",), "Holiday market Saturday, and 1 more"),
    ):
        fast = composer.message(recipient(), topics, NOW)
        slow = reference_message(data, content, recipient(), topics, NOW, renderer=RENDERER)
        assert fast is not None and slow is not None
        assert_same_message(fast, slow)
        assert assert_compliant(fast, data)["Subject"] == subject
