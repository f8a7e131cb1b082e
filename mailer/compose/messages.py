"""Message building: per-recipient RFC 5322 bytes, fast, and provably equal to the slow way.

Building an ``EmailMessage`` and calling ``as_bytes()`` costs about 4 ms per 30 KB digest here,
more than sending it. Subscribers with the same topics get the same digest except for a few
values (To, Date, Message-ID, List-Unsubscribe, and the unsubscribe and preferences URLs in the
bodies), so ``DigestComposer`` renders and serializes the MIME message once per topic set, with
random markers where those values go, and then splices the values in per recipient.

Why splicing is exact (the invariants; ``tests/test_messages.py`` checks each one against
``reference_message``, the slow path):

1. Quoted-printable is line-local (RFC 2045 §6.7): soft line breaks (``=`` CRLF) only occur
   inside the encoding of one hard line, so an encoded body is the concatenation of its hard
   lines' encodings. Replacing one hard line's encoding with ``binascii.b2a_qp`` of another
   line changes that decoded line only, and b2a_qp keeps each encoded line within 76
   characters (RFC 2045 §6.7 rule 5).
2. The templates put every per-recipient URL on a line of its own (the text part by layout,
   the HTML part by ``rendering.isolate_links``), so only short lines are re-encoded. A marker
   anywhere else would still be handled correctly, just more slowly: the composer finds the
   whole logical line (following soft breaks) around any marker.
3. The markers carry a random nonce per composer, so article text cannot forge one, and after
   compiling no static chunk may contain one (checked: a link that could not be spliced is an
   error, never a broken link in 50,000 mailboxes).
4. The multipart boundary chosen by the ``email`` package contains ``==``, which never occurs
   in quoted-printable output, so spliced body lines cannot collide with it (RFC 2046 §5.1.1).
5. Header values are spliced verbatim (``refold_source="none"``): each is checked to be ASCII
   without CR or LF, and the only fold is the CRLF SP we place after the comma in
   List-Unsubscribe (RFC 2369 §2 forbids whitespace inside the brackets). Nothing is ever
   RFC 2047-encoded there, which would make one-click unsubscribe disappear.
6. Per-recipient URLs contain no character HTML escapes (checked on the base URL), so the same
   value is right in the text part, in the HTML part, and in the headers.

The bytes use CRLF throughout, so a DKIM signer can prepend its header to them unchanged.
"""

from __future__ import annotations

import binascii
import email.policy
import functools
import logging
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.header import Header
from email.message import EmailMessage
from email.utils import format_datetime
from html import unescape
from typing import Final
from urllib.parse import quote

from mailer.compose.rendering import LinkView, Renderer, digest_context, leads, site_view
from mailer.compose.wire import CrlfOnly, SmtpReady, has_leading_dot, is_crlf_only, relax_lines
from mailer.config.settings import Settings, SiteSettings
from mailer.errors import AddressError, ConfigError, DeliveryError, RenderError
from mailer.models import Article, IssueContent, Recipient
from mailer.subscribers.links import archive_url, links_for
from mailer.text import ATEXT, DOT_ATOM, is_inert_url, one_line

log = logging.getLogger(__name__)

# RFC 2045 §6.7: encoded lines of at most 76 characters (policy.SMTP's 78 would break it);
# refold_source="none" keeps set_raw values exactly as given (see COMPLIANCE pitfalls 1-2).
POLICY: Final = email.policy.SMTP.clone(max_line_length=76, refold_source="none")

HEADER_WIDTH = 78  # RFC 5322 §2.1.1: SHOULD be no more than 78 characters, MUST be ≤ 998
SAMPLE_UID = "sample-subscriber-0000"  # a well-formed uid no subscriber has (for previews)

# text.is_plain_address, with one more rule for a To header: the domain has a dot in it
# ("+" where that has "*"), as every address a subscriber can give has.
_ADDRESS_RE = re.compile(rf"{DOT_ATOM}@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+")
# "." first: ATEXT ends with "-", which before "." would read as a range.
_MESSAGE_ID_RE = re.compile(rf"<[.{ATEXT}]+@[.{ATEXT}]+>")


# --- headers --------------------------------------------------------------------------------


def check_address(address: str) -> str:
    """``address`` if it is a plain ASCII ``local@domain`` fit for a To header, else AddressError.

    Recipients are normalized at sign-up; this is the last line of defence for the header.
    """
    if len(address) > 254 or not _ADDRESS_RE.fullmatch(address):
        raise AddressError(address, "not a plain ASCII address usable in a To header")
    return address


def check_message_id(message_id: str) -> str:
    """``message_id`` if it is a ``<left@right>`` msg-id (RFC 5322 §3.6.4) on one line."""
    if len(message_id) > 250 or not _MESSAGE_ID_RE.fullmatch(message_id):
        raise DeliveryError(f"not a usable Message-ID: {message_id!r}")
    return message_id


def date_value(now: datetime) -> str:
    """The Date header for ``now`` (RFC 5322 §3.3), which must be timezone-aware; in UTC."""
    if now.tzinfo is None or now.utcoffset() is None:
        raise ValueError(f"now must be timezone-aware, got {now!r}")
    return format_datetime(now.astimezone(UTC))


def list_unsubscribe_value(site: SiteSettings, unsubscribe_url: str) -> str:
    """``<https URL>`` and, if configured, ``<mailto:…?subject=unsubscribe-TOKEN>``.

    RFC 8058 §3.1: one HTTPS URI (the one-click POST target); RFC 2369 §2: angle brackets, no
    whitespace inside them, comma separated. Folded only after the comma. TOKEN is the last
    path segment of ``unsubscribe_url`` (``links_for`` puts the signed token there).
    """
    value = f"<{unsubscribe_url}>"
    if site.unsubscribe_mailto:
        token = unsubscribe_url.rsplit("/", 1)[1]
        mailbox = quote(site.unsubscribe_mailto, safe="@+")
        value += f",\r\n <mailto:{mailbox}?subject=unsubscribe-{token}>"
    return value


def list_id_value(site: SiteSettings) -> str:
    """``"Name" <list-id>`` (RFC 2919 §3), the phrase quoted or RFC 2047-encoded, folded.

    "&" is not special in RFC 5322, but quoting costs nothing and keeps any punctuation in
    the name safe; a non-ASCII name becomes encoded-words (RFC 2047 §5(3)), never quoted.
    """
    name = one_line(site.name)
    if name.isascii():
        words = ('"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"').split(" ")
    else:
        # header_name makes the first encoded-word fit after "List-Id: " (RFC 2047 §2: ≤ 75).
        words = Header(name, "utf-8", header_name="List-Id").encode(linesep="\n").split()
    return fold_words("List-Id", [*words, f"<{site.list_id}>"])


def fold_words(name: str, words: Sequence[str]) -> str:
    """Join ``words`` with spaces, folding (CRLF SP) where a line would pass 78 characters.

    RFC 5322 §2.2.3: folding is a CRLF before existing whitespace; unfolding restores it.
    """
    lines: list[str] = []
    current = ""
    indent = len(name) + 2  # "Name: " on the first line, one space on the others
    for word in words:
        if current and indent + len(current) + 1 + len(word) > HEADER_WIDTH:
            lines.append(current)
            current, indent = word, 1
        else:
            current = f"{current} {word}" if current else word
    lines.append(current)
    return "\r\n ".join(lines)


@dataclass(frozen=True)
class PersonalHeaders:
    """The header values that differ per recipient."""

    to: str
    date: str
    message_id: str
    list_unsubscribe: str | None


def add_headers(
    msg: EmailMessage,
    settings: Settings,
    subject: str,
    personal: PersonalHeaders,
    *,
    raw: bool,
    list_headers: bool,
) -> None:
    """Set every header in a fixed order (the splice and the reference share it).

    ``raw`` writes the personal values verbatim (the composer's markers); otherwise they go
    through the ``email`` package's header parsers, the obviously-correct way.
    """
    site = settings.site
    msg["From"] = site.from_address
    if site.reply_to:
        msg["Reply-To"] = site.reply_to
    _set(msg, "To", personal.to, raw=raw)
    msg["Subject"] = one_line(subject)  # RFC 2047 encoded-words when non-ASCII, by the package
    _set(msg, "Date", personal.date, raw=raw)
    # Verbatim on one line (≤ 998, RFC 5322 §2.1.1): the email package folds a msg-id of 64-75
    # characters onto a continuation line, and its own parser then returns it with a leading
    # space, a lookup key that no longer matches the ledger's. MTAs write it unfolded too.
    msg.set_raw("Message-ID", personal.message_id)
    if list_headers:
        msg.set_raw("List-Id", list_id_value(site))
        if personal.list_unsubscribe is not None:
            # set_raw: never RFC 2047-encoded (COMPLIANCE pitfall 1), one field (RFC 2369 §3).
            msg.set_raw("List-Unsubscribe", personal.list_unsubscribe)
            msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"  # RFC 8058 §3.1
    msg["Auto-Submitted"] = "auto-generated"  # RFC 3834 §5: periodic, not a reply
    if list_headers and site.feedback_id:
        msg["Feedback-ID"] = site.feedback_id


def _set(msg: EmailMessage, name: str, value: str, *, raw: bool) -> None:
    if raw:
        msg.set_raw(name, value)
    else:
        msg[name] = value


def attach_parts(msg: EmailMessage, text: str, html: str) -> None:
    """multipart/alternative: text/plain first, text/html last (RFC 2046 §5.1.4), QP, utf-8."""
    msg.set_content(text, cte="quoted-printable")  # never 8bit (COMPLIANCE pitfall 3)
    msg.add_alternative(html, subtype="html", cte="quoted-printable")
    for part in msg.iter_parts():
        # add_alternative copies MIME-Version into the part; it belongs in the top header only.
        del part["MIME-Version"]


# --- rendering shared by the fast and the reference path -------------------------------------


def _template_name(settings: Settings, digest_key: str) -> str:
    # An issue can outlive its [[digests]] entry; the stock template still renders it.
    return next((d.template for d in settings.digests if d.key == digest_key), "digest")


def shown_topics(
    settings: Settings, content: IssueContent, topics: Iterable[str]
) -> tuple[str, ...]:
    """The topics of ``topics`` that have articles in this issue, in configured topic order.

    This is the cache key of a rendered body: two subscribers whose choices differ only in
    topics without articles in this issue get the same digest.
    """
    order = {key: index for index, key in enumerate(settings.topic_keys)}
    present = {article.topic for article in content.articles}
    chosen = present.intersection(topics)
    return tuple(sorted(chosen, key=lambda key: (order.get(key, len(order)), key)))


def _articles(content: IssueContent, shown: Sequence[str]) -> list[Article]:
    wanted = set(shown)
    return [article for article in content.articles if article.topic in wanted]


def subject_for(
    settings: Settings, content: IssueContent, shown: Sequence[str], renderer: Renderer
) -> str:
    """The subject of the copy of ``content`` cut to the ``shown`` topics.

    The issue's subject (``issues.subject``, rendered when it was made and shown to staff)
    names its first article and counts all of them. A reader who gets every article gets that
    subject; one whose topics leave some out gets the digest's subject rendered again for what
    their copy holds, so that it never names an article they were not sent nor counts ones
    they were not (a subject must be accurate: 15 USC 7704(a)(2), COMPLIANCE 4.8). That costs
    one small render per topic set, not per reader. An issue whose digest has left the config,
    or whose subject no longer renders, keeps the issue's subject.
    """
    articles = _articles(content, shown)
    if len(articles) == len(content.articles):
        return content.subject
    digest = settings.find_digest(content.digest_key)
    if digest is None:
        return content.subject
    try:
        return renderer.render_subject(digest, content.date, leads(settings, articles))
    except RenderError as exc:
        log.warning(
            "subject not rendered for a topic set; the issue's is used",
            extra={"issue": content.issue_id, "error": str(exc)},
        )
        return content.subject


def render_digest(
    settings: Settings,
    content: IssueContent,
    shown: Sequence[str],
    links: LinkView,
    renderer: Renderer,
    web_copy: object | None = None,
) -> tuple[str, str]:
    """The HTML (CSS inlined) and text bodies of ``content`` cut to the ``shown`` topics.

    ``web_copy`` (``mailer.issues.archive.WebCopy``) is what the archive's page adds around
    the mail; never set for a message.

    A personal digest must carry the unsubscribe, preferences and privacy links and the
    postal address in both parts; a template that drops one is refused here.
    """
    # A correction (``mailer articles retract``) has its own template, whatever its digest.
    correction = content.correction
    name = "correction" if correction is not None else _template_name(settings, content.digest_key)
    context = digest_context(settings, content, _articles(content, shown), links)
    context["web_copy"] = web_copy
    context["correction"] = correction
    if correction is not None:
        context["preheader"] = one_line(correction.text, limit=140)
    html = renderer.render_html(f"email/{name}.html", context)
    text = renderer.render(f"email/{name}.txt", context)
    if links.personal:
        needed = (links.unsubscribe, links.preferences, links.privacy)
        require_links(html, text, needed, settings, f"email/{name}")
    return html, text


def require_links(
    html: str, text: str, links: Sequence[str], settings: Settings, template: str
) -> None:
    """Both parts hold every link and every postal-address line (RFC 8058, CAN-SPAM §7704)."""
    needles = [*links, *site_view(settings).postal_lines]
    visible_html = unescape(html)
    for part, body in ((f"{template}.txt", text), (f"{template}.html", visible_html)):
        for needle in needles:
            if needle not in body:
                raise RenderError(f"must contain {needle!r} (compliance footer)", template=part)


# --- the splice ------------------------------------------------------------------------------


@dataclass(frozen=True)
class _HeaderSlot:
    """A header value written verbatim (checked ASCII, no CR/LF but our own fold)."""

    name: str

    def fill(self, values: Mapping[str, str]) -> bytes:
        return values[self.name].encode("ascii")


@dataclass(frozen=True)
class _LineSlot:
    """One hard line of a QP body that holds markers: literal text and slot names alternate."""

    pieces: tuple[str, ...]

    def fill(self, values: Mapping[str, str]) -> bytes:
        pieces = self.pieces
        if len(pieces) == 3:  # the usual case: one URL on the line
            line = pieces[0] + values[pieces[1]] + pieces[2]
        else:
            line = "".join(values[p] if i % 2 else p for i, p in enumerate(pieces))
        # b2a_qp soft-breaks at 76 with "=\n"; the message uses CRLF (RFC 5322 §2.3).
        return binascii.b2a_qp(line.encode("utf-8")).replace(b"\n", b"\r\n")


class _Markers:
    """Random placeholders: ``MAILERSLOT<nonce><NAME>X``, unforgeable by article text."""

    def __init__(self) -> None:
        self.prefix = f"MAILERSLOT{secrets.token_hex(8)}"
        self.text_re = re.compile(re.escape(self.prefix) + "([A-Z]+)X")
        self.bytes_re = re.compile(self.text_re.pattern.encode())

    def __call__(self, name: str) -> str:
        return f"{self.prefix}{name}X"


class SplicedMessage:
    """MIME bytes serialized once, cut into static chunks and per-recipient slots."""

    def __init__(self, raw: bytes, markers: _Markers) -> None:
        self.parts = tuple(_cut(raw, markers))
        # Checked once: the slots hold no line break of their own (addresses and Message-IDs
        # are checked, URLs are built from checked parts, QP lines end in our CRLF), so every
        # message filled from CRLF-only chunks is CRLF-only (the SMTP client skips its check).
        self._wire: type[bytes] = CrlfOnly if is_crlf_only(raw) else bytes
        prefix = markers.prefix.encode()
        # And no static chunk starts a line with a dot (a chunk is taken to begin a line, which
        # errs on the safe side); the lines filled in per recipient are checked in fill().
        if self._wire is CrlfOnly and not any(
            isinstance(part, bytes) and has_leading_dot(part) for part in self.parts
        ):
            self._wire = SmtpReady
        if any(isinstance(part, bytes) and prefix in part for part in self.parts):
            raise RenderError(
                "a per-recipient value could not be isolated for splicing", template="email/*"
            )
        # fill() copies the static chunks and overwrites the slot positions.
        self._chunks = [part if isinstance(part, bytes) else b"" for part in self.parts]
        self._slots = [
            (index, part) for index, part in enumerate(self.parts) if not isinstance(part, bytes)
        ]
        self._relaxed = _relaxed_template(self.parts) if self._wire is not bytes else None

    @property
    def line_sources(self) -> tuple[str, ...]:
        """The body lines re-encoded per recipient, slots shown as ``{NAME}`` (diagnostics)."""
        return tuple(
            "".join(f"{{{p}}}" if i % 2 else p for i, p in enumerate(part.pieces))
            for part in self.parts
            if isinstance(part, _LineSlot)
        )

    def fill(self, values: Mapping[str, str]) -> bytes:
        """The message with ``values`` (slot name → value) in place of every marker."""
        out = self._chunks.copy()
        wire = self._wire
        for index, slot in self._slots:
            out[index] = filled = slot.fill(values)
            # A body line filled in (QP, soft breaks included) may begin a line with a dot;
            # a header value is never at a line start.
            if wire is SmtpReady and isinstance(slot, _LineSlot) and has_leading_dot(filled):
                wire = CrlfOnly
        message = wire(b"".join(out))
        if self._relaxed is not None and isinstance(message, CrlfOnly):
            message.relaxed_body = functools.partial(self._relaxed_body, out)
        return message

    def _relaxed_body(self, filled: list[bytes]) -> list[bytes]:
        """The body of the message filled as ``filled`` in DKIM's relaxed canonical form: the
        template's canonical parts, and each line filled in canonicalized (a line ends where
        its static successor begins with CRLF, so a space at its end goes)."""
        assert self._relaxed is not None
        relaxed = self._relaxed.copy()
        for index, slot in self._slots:
            if isinstance(slot, _LineSlot):
                relaxed[index] = relax_lines(filled[index]).rstrip(b" ")
        return relaxed


def _cut(raw: bytes, markers: _Markers) -> Iterable[bytes | _HeaderSlot | _LineSlot]:
    """Static chunks and slots of ``raw``: header markers verbatim, body markers per line."""
    head_end = raw.index(b"\r\n\r\n") + 2
    pos = 0
    for match in markers.bytes_re.finditer(raw, 0, head_end):
        yield raw[pos : match.start()]
        yield _HeaderSlot(match.group(1).decode("ascii"))
        pos = match.end()
    for start, end in _logical_lines(raw, head_end):
        group = raw[start:end]
        # A marker may straddle a soft break, so look for it in the decoded line.
        decoded = binascii.a2b_qp(group) if b"=" in group else group
        if markers.prefix.encode() in decoded:
            yield raw[pos:start]
            yield _LineSlot(tuple(markers.text_re.split(decoded.decode("utf-8"))))
            pos = end
    yield raw[pos:]


def _relaxed_template(parts: Sequence[bytes | _HeaderSlot | _LineSlot]) -> list[bytes] | None:
    """The body's static chunks in DKIM's relaxed canonical form, b"" at the slots (and for
    the header), or None where the body cannot be put together from its parts.

    Each chunk is canonicalized on its own, which is exact when no run of spaces and no line
    end crosses a chunk's edge: every line slot is a whole line (its chunk before ends a line,
    its chunk after begins with that line's CRLF), and the last chunk holds the body's end
    (so that dropping the trailing empty lines stops inside it).
    """
    relaxed: list[bytes] = []
    in_body = False
    for index, part in enumerate(parts):
        if isinstance(part, _HeaderSlot):
            if in_body:
                return None
            relaxed.append(b"")
        elif isinstance(part, _LineSlot):
            before, after = parts[index - 1] if index else b"", parts[index + 1 : index + 2]
            whole_line = (
                in_body
                and isinstance(before, bytes)
                and before.endswith(b"\n")
                and len(after) == 1
                and isinstance(after[0], bytes)
                and after[0].startswith(b"\r\n")
            )
            if not whole_line:
                return None
            relaxed.append(b"")
        elif in_body:
            relaxed.append(relax_lines(part))
        else:
            end = part.find(b"\r\n\r\n")
            in_body = end >= 0
            relaxed.append(relax_lines(part[end + 4 :]) if in_body else b"")
    if not in_body or not relaxed[-1].rstrip(b"\r\n") or isinstance(parts[-1], _LineSlot):
        return None
    # Rule (c): the empty lines at the body's end go, and it ends with one CRLF (the template
    # is CRLF-only, so stripping CR and LF strips whole line breaks).
    relaxed[-1] = relaxed[-1].rstrip(b"\r\n") + b"\r\n"
    return relaxed


def _logical_lines(raw: bytes, start: int) -> Iterable[tuple[int, int]]:
    """(start, end) of each CRLF line from ``start``, lines joined by a QP soft break (``=``)
    counted as one. Non-QP lines (boundaries, part headers) come out too, harmlessly."""
    group = start
    pos = start
    size = len(raw)
    while pos < size:
        eol = raw.find(b"\r\n", pos)
        if eol < 0:
            eol = size
        if eol < size and eol > pos and raw[eol - 1] == 0x3D:  # "=" then CRLF: soft break
            pos = eol + 2
            continue
        yield group, eol
        pos = group = eol + 2


# --- the public surface ----------------------------------------------------------------------


class DigestComposer:
    """Builds the per-recipient messages of one issue, rendering once per topic set.

    The delivery worker keeps one per issue and calls ``message`` for every recipient.
    ``renderer`` is its owner's (the worker's, the web app's), shared by the composers it makes.
    """

    def __init__(self, settings: Settings, content: IssueContent, *, renderer: Renderer) -> None:
        site = settings.site
        if not is_inert_url(site.base_url):
            raise ConfigError(
                "[site].base_url must be an ASCII URL (punycode host) of at most 800 characters "
                "without spaces or any of & ' \" < >: it is spliced into headers and HTML",
                path=str(settings.path) if settings.path else None,
            )
        self.settings = settings
        self.content = content
        self.renderer = renderer
        self._markers = _Markers()
        self._spliced: dict[tuple[str, ...], SplicedMessage] = {}
        self._shown: dict[frozenset[str], tuple[str, ...]] = {}
        self._date: tuple[datetime, str] | None = None

    def message(self, recipient: Recipient, topics: Iterable[str], now: datetime) -> bytes | None:
        """The RFC 5322 bytes (CRLF) for ``recipient``, or None if no article is in ``topics``.

        ``now`` is the Date header (timezone-aware). The result equals, header for header and
        part for part, what ``reference_message`` builds the slow way.
        """
        spliced = self.spliced(topics)
        if spliced is None:
            return None
        return spliced.fill(self._values(recipient, now))

    def spliced(self, topics: Iterable[str]) -> SplicedMessage | None:
        """The once-serialized message for ``topics`` (None if no article is in them)."""
        shown = self._shown_for(topics)
        if not shown:
            return None
        return self._spliced.get(shown) or self._compile(shown)

    def preview(
        self, topics: Iterable[str], *, sample: bool = False, web_copy: object | None = None
    ) -> tuple[str, str]:
        """HTML and text of the digest for ``topics``, for ``digest preview`` and the archive.

        By default the links are neutral (the web copy: no personal link at all). With
        ``sample`` they are shaped like a real subscriber's, for a uid nobody has.
        """
        shown = self._shown_for(topics)
        site = self.settings.site
        if sample:
            sample_links = links_for(site, SAMPLE_UID)
            links = self._links(sample_links.unsubscribe, sample_links.preferences)
        else:
            links = LinkView(
                unsubscribe=site.base_url + "/",
                preferences=site.base_url + "/",
                privacy=site.privacy_policy_url,
                archive=archive_url(site, self.content.issue_id),
                home=site.base_url + "/",
                personal=False,
            )
        return render_digest(self.settings, self.content, shown, links, self.renderer, web_copy)

    def _shown_for(self, topics: Iterable[str]) -> tuple[str, ...]:
        key = frozenset(topics)
        shown = self._shown.get(key)
        if shown is None:
            wanted = key
            if self.content.correction is not None:
                # A correction goes to whoever received the article, whatever their topics
                # are now: it shows its one article's topic.
                wanted = frozenset(a.topic for a in self.content.articles)
            shown = self._shown[key] = shown_topics(self.settings, self.content, wanted)
        return shown

    def _links(self, unsubscribe: str, preferences: str) -> LinkView:
        return personal_links(self.settings, self.content, unsubscribe, preferences)

    def _compile(self, shown: tuple[str, ...]) -> SplicedMessage:
        """Render and serialize the message for ``shown`` once, with markers for the slots."""
        mark = self._markers
        links = self._links(mark("UNSUB"), mark("PREFS"))
        html, text = render_digest(self.settings, self.content, shown, links, self.renderer)
        msg = EmailMessage(policy=POLICY)
        personal = PersonalHeaders(mark("TO"), mark("DATE"), mark("MSGID"), mark("LISTUNSUB"))
        subject = subject_for(self.settings, self.content, shown, self.renderer)
        add_headers(msg, self.settings, subject, personal, raw=True, list_headers=True)
        attach_parts(msg, text, html)
        spliced = self._spliced[shown] = SplicedMessage(msg.as_bytes(), mark)
        return spliced

    def _values(self, recipient: Recipient, now: datetime) -> dict[str, str]:
        site = self.settings.site
        links = links_for(site, recipient.uid)
        return {
            "TO": check_address(recipient.email),
            "DATE": self._date_value(now),
            "MSGID": check_message_id(recipient.message_id),
            "LISTUNSUB": list_unsubscribe_value(site, links.unsubscribe),
            "UNSUB": links.unsubscribe,
            "PREFS": links.preferences,
        }

    def _date_value(self, now: datetime) -> str:
        # The Date header has whole seconds: format it once per second, not per message.
        second = now.replace(microsecond=0)
        if self._date is None or self._date[0] != second:
            self._date = (second, date_value(now))
        return self._date[1]


def reference_message(
    settings: Settings,
    content: IssueContent,
    recipient: Recipient,
    topics: Iterable[str],
    now: datetime,
    *,
    renderer: Renderer,
) -> bytes | None:
    """The same message as ``DigestComposer.message``, built the slow, obviously-correct way.

    A full render with the real URLs and an ``EmailMessage`` serialized by the ``email``
    package (about 4 ms). Tests use it as the oracle for the splice.
    """
    shown = shown_topics(settings, content, topics)
    if not shown:
        return None
    links = links_for(settings.site, recipient.uid)
    return whole_message(
        settings,
        content,
        shown,
        to=recipient.email,
        message_id=recipient.message_id,
        subject=subject_for(settings, content, shown, renderer),
        unsubscribe=links.unsubscribe,
        preferences=links.preferences,
        now=now,
        renderer=renderer,
    )


def personal_links(
    settings: Settings, content: IssueContent, unsubscribe: str, preferences: str
) -> LinkView:
    """The links of one reader's copy of ``content``: theirs, and the site's shared ones."""
    return reader_links(
        settings, unsubscribe, preferences, archive_url(settings.site, content.issue_id)
    )


def reader_links(settings: Settings, unsubscribe: str, preferences: str, archive: str) -> LinkView:
    """The links of a mail to one reader: their own unsubscribe and preferences links, the
    site's privacy policy and home page, and ``archive`` (an issue's web copy, or the
    archive)."""
    site = settings.site
    return LinkView(
        unsubscribe=unsubscribe,
        preferences=preferences,
        privacy=site.privacy_policy_url,
        archive=archive,
        home=site.base_url + "/",
        personal=True,
    )


def list_message(
    settings: Settings,
    *,
    to: str,
    message_id: str,
    subject: str,
    unsubscribe: str,
    text: str,
    html: str,
    now: datetime,
) -> bytes:
    """A rendered mail to one reader, as list mail (List-Unsubscribe with one-click, List-Id)
    serialized by the ``email`` package: the header order and MIME shape every such mail
    shares."""
    msg = EmailMessage(policy=POLICY)
    personal = PersonalHeaders(
        to=check_address(to),
        date=date_value(now),
        message_id=check_message_id(message_id),
        list_unsubscribe=list_unsubscribe_value(settings.site, unsubscribe),
    )
    add_headers(msg, settings, subject, personal, raw=False, list_headers=True)
    attach_parts(msg, text, html)
    return msg.as_bytes()


def whole_message(
    settings: Settings,
    content: IssueContent,
    shown: tuple[str, ...],
    *,
    to: str,
    message_id: str,
    subject: str,
    unsubscribe: str,
    preferences: str,
    now: datetime,
    renderer: Renderer,
) -> bytes:
    """One reader's message rendered in full and serialized by the ``email`` package: the
    reference the splice is checked against, and a test copy (other links, other subject)."""
    view = personal_links(settings, content, unsubscribe, preferences)
    html, text = render_digest(settings, content, shown, view, renderer)
    return list_message(
        settings,
        to=to,
        message_id=message_id,
        subject=subject,
        unsubscribe=unsubscribe,
        text=text,
        html=html,
        now=now,
    )


@dataclass(frozen=True)
class ConfirmLinkView:
    """The links a confirmation email sees."""

    confirm: str
    privacy: str
    home: str


def build_confirmation(
    settings: Settings,
    recipient: Recipient,
    now: datetime,
    *,
    renderer: Renderer,
) -> bytes:
    """The double opt-in email: "Confirm your subscription to …" with the signed confirm link.

    Transactional, to one person who is not on the list yet: no List-* headers. The
    Message-ID (``recipient.message_id``) is what the consent record keeps (GDPR Art. 7(1)).
    """
    site = settings.site
    links = ConfirmLinkView(
        confirm=links_for(site, recipient.uid).confirm,
        privacy=site.privacy_policy_url,
        home=site.base_url + "/",
    )
    context = {"site": site_view(settings), "links": links}
    html = renderer.render_html("email/confirm.html", context)
    text = renderer.render("email/confirm.txt", context)
    require_links(html, text, (links.confirm, links.privacy), settings, "email/confirm")
    msg = EmailMessage(policy=POLICY)
    personal = PersonalHeaders(
        to=check_address(recipient.email),
        date=date_value(now),
        message_id=check_message_id(recipient.message_id),
        list_unsubscribe=None,
    )
    subject = f"Confirm your subscription to {one_line(site.name)}"
    add_headers(msg, settings, subject, personal, raw=False, list_headers=False)
    attach_parts(msg, text, html)
    return msg.as_bytes()
