"""DKIM signing: dkimpy verifies what a real SMTP server received, tampering breaks it, and the
OpenSSL fast path is byte-identical to dkimpy's own (pure Python) signing."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import stat
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dkim
import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from dkim.canonicalization import Relaxed
from dkim.util import parse_tag_value
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.compose.dkim import (
    SIGNED_FIELDS,
    DkimError,
    DkimKeyError,
    DkimSigner,
    dns_record_name,
    dns_record_value,
    generate_keypair,
    load_private_key,
    relaxed_body,
    zone_file_line,
)
from mailer.compose.messages import DigestComposer, build_confirmation
from mailer.compose.rendering import Renderer
from mailer.compose.wire import CrlfOnly, SmtpReady, has_leading_dot, is_crlf_only
from mailer.config.load import parse_settings
from mailer.config.settings import DkimSettings
from mailer.delivery.policy import Outcome
from mailer.delivery.pool import SmtpPool
from mailer.errors import ConfigError, MailerError
from mailer.models import Article, IssueContent, Recipient
from tests.factories import NOW, TOPICS, config_dict, make_settings
from tests.smtp_server import FaultServer

pytest_plugins = ["tests.smtp_server"]

DOMAIN = "news.example.org"
SELECTOR = "nl2026"
SETTINGS = make_settings(site__feedback_id="2026w47:updates:digest:examplemedia")
SIGNED_AT = datetime(2026, 11, 20, 12, 0, 5, tzinfo=UTC)
# A throwaway 768-bit key (cryptography refuses to generate one below 1024 bits).
SMALL_KEY = b"""-----BEGIN RSA PRIVATE KEY-----
MIIBywIBAAJhAJa2eaa5vPPegxhW8dEY41uQBjC6HLGpRAKWjYqT05/fZTMo5Vtm
Fnl1RlfZWtqf25VbI1uY7C73TteTug1YaLvGDNFLSm6uu97lmdMflK1sbeFb27Ia
Q3HGLubyxFkKDwIDAQABAmBHUldDhUZcCgLz88E/+I0veXrUeF633KhoqSKWX9qY
H7neeg4AMNGV7N+7FwsdxuQDYzd7WHcuHz9jOhpu1Qqb6x4//l7Q//k2ZG4k0xwk
zK0vPHi51R/Waj16JaDUNyECMQDEr0Xg47U89RiLPrqBpcHnBlnCk1eHT8Mzjelg
n60kGfUSIbdPBA3d6JmBY7v3qJcCMQDEKgRrLHPTEV8BMFGaQ0ntxznbr2QCiak5
/zb/xT/XkQX+DG4QENz6tsXHyu9FoUkCMQCogQ0Z/ZvhTI4phaVdu3fjCHLQG1GK
0JAI1BTUPhik7EQks5QLcwq6SjNxQdPg+qMCMAVmUrDQjG+m7sKNnfFtIL/W2BTg
AxS+zVW3XMA1ochBSbTwiqcOj8am+VLCl0uHYQIxAIlrhUrPSnmN95Iea/r3QtCu
H3S9DYwW7Pp3eDlsYtZ9O0Ntsw8gE6edoXTTBPXtlw==
-----END RSA PRIVATE KEY-----
"""


def article(n: int) -> Article:
    return Article(
        id=n,
        guid=f"guid-{n}",
        topic=TOPICS[n % 3],
        title=f"Gate {n} closed for resurfacing — plan ahead",
        summary="The main gate closes Saturday from 0600 to 1800.\n\nUse Sneads Ferry.",
        why_it_matters="Expect longer lines on the way in; allow 20 extra minutes.",
        body="",
        link=f"https://news.example.org/articles/{n}",
        published_at=NOW,
    )


CONTENT = IssueContent(
    issue_id=42,
    digest_key="weekly",
    digest_name="Weekly digest",
    subject="Camp Lejeune & New River Updates — week of 20 November",
    date=NOW,
    articles=tuple(article(n) for n in range(12)),  # a realistic ~30 KB digest
)
RECIPIENT = Recipient(
    email="ann.reader@example.org",
    name="Ann Reader",
    uid="AAAAAAAAAAAAAAAAAAAAAA",
    message_id="<weekly.202611201200.42.AAAAAAAAAAAAAAAAAAAAAA@news.example.org>",
)


def digest_message() -> bytes:
    raw = DigestComposer(SETTINGS, CONTENT, renderer=Renderer()).message(RECIPIENT, TOPICS, NOW)
    assert raw is not None
    return raw


PLAIN = (
    b"From: Digest <digest@news.example.org>\r\n"
    b"To: reader@example.org\r\n"
    b"Subject:   lots   of\t whitespace  \r\n"
    b"\tfolded\r\n"
    b"Date: Fri, 20 Nov 2026 12:00:00 +0000\r\n"
    b"Message-ID: <plain.1@news.example.org>\r\n"
    b"\r\n"
    b"tabs\tand  spaces   \r\n"
    b" \t \r\n"
    b"trailing empty lines follow\r\n"
    b"\r\n"
    b"\r\n"
)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def signer(rsa_key: rsa.RSAPrivateKey) -> DkimSigner:
    return DkimSigner(DOMAIN, SELECTOR, rsa_key, clock=lambda: SIGNED_AT)


def dns_for(record: str, name: str = f"{SELECTOR}._domainkey.{DOMAIN}") -> Callable[..., Any]:
    """A dkimpy dnsfunc that knows one TXT record and nothing else."""

    def lookup(qname: bytes, timeout: int = 5) -> bytes | None:
        return record.encode() if qname == f"{name}.".encode() else None

    return lookup


def verifies(signed: bytes, signer: DkimSigner) -> bool:
    result: bool = dkim.verify(signed, dnsfunc=dns_for(signer.dns_record()), minkey=1024)
    return result


def tags(signed: bytes) -> dict[bytes, bytes]:
    headers, _ = dkim.rfc822_parse(signed)
    name, value = headers[0]
    assert name == b"DKIM-Signature"
    parsed: dict[bytes, bytes] = parse_tag_value(value)
    return parsed


def h_list(signed: bytes) -> list[bytes]:
    return [h.strip().lower() for h in tags(signed)[b"h"].split(b":")]


def pem(key: Any, fmt: serialization.PrivateFormat) -> bytes:
    data: bytes = key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())
    return data


# --- what a real SMTP server received --------------------------------------------------------


async def test_signed_digest_and_confirmation_received_over_smtp_verify_with_dkimpy(
    smtp_server: FaultServer, tmp_path: Path
) -> None:
    key_file = tmp_path / "dkim.pem"
    record = generate_keypair(key_file)
    config = config_dict(
        dkim={"domain": DOMAIN, "selector": SELECTOR, "private_key_file": str(key_file)},
        smtp={"host": smtp_server.host, "port": smtp_server.port, "timeout": 5},
    )
    settings = parse_settings(config, env={"MAILER_SECRET_KEY": "test-secret-0123456789abcdef"})
    assert settings.dkim is not None
    signer = DkimSigner.from_settings(settings.dkim)
    assert signer.dns_record() == record
    digest = signer.sign(digest_message())
    confirmation = signer.sign(build_confirmation(SETTINGS, RECIPIENT, NOW, renderer=Renderer()))
    async with SmtpPool(settings.smtp, local_hostname="client.test") as pool:
        for data in (digest, confirmation):
            result = await pool.send("bounces@news.example.org", RECIPIENT.email, data)
            assert result.outcome is Outcome.SENT
    received = [r.data for r in smtp_server.received]
    assert received == [digest, confirmation]  # the signed bytes are exactly the sent bytes
    lookup = dns_for(record, dns_record_name(settings.dkim))
    for data in received:
        assert dkim.verify(data, dnsfunc=lookup, minkey=1024)


# --- what the signature covers ---------------------------------------------------------------


def test_signature_tags_relaxed_no_length_timestamp_and_oversigned_headers(
    signer: DkimSigner,
) -> None:
    signed = signer.sign(digest_message())
    t = tags(signed)
    assert t[b"a"] == b"rsa-sha256"
    assert t[b"c"] == b"relaxed/relaxed"
    assert t[b"d"] == DOMAIN.encode()
    assert t[b"s"] == SELECTOR.encode()
    assert t[b"t"] == str(int(SIGNED_AT.timestamp())).encode()
    assert b"l" not in t  # RFC 6376 §8.2
    names = h_list(signed)
    for once_present in (
        b"from",
        b"to",
        b"subject",
        b"date",
        b"message-id",
        b"list-id",
        b"list-unsubscribe",
        b"list-unsubscribe-post",
        b"feedback-id",
        b"reply-to",
        b"mime-version",
        b"content-type",
    ):
        assert names.count(once_present) == 2, once_present  # present once, signed twice
    assert set(names) == set(SIGNED_FIELDS)
    # The signature field sits on top, folded within 78 characters (RFC 5322 §2.1.1).
    lines = signed.split(b"\r\n")
    end = next(i for i, line in enumerate(lines) if i and not line[:1].isspace())
    assert lines[0].startswith(b"DKIM-Signature: ")
    assert all(len(line) <= 78 for line in lines[:end])


def test_absent_list_headers_are_signed_once_so_adding_them_breaks_the_signature(
    signer: DkimSigner,
) -> None:
    signed = signer.sign(build_confirmation(SETTINGS, RECIPIENT, NOW, renderer=Renderer()))
    names = h_list(signed)
    assert names.count(b"list-unsubscribe") == 1
    assert names.count(b"from") == 2
    assert verifies(signed, signer)
    forged = signed.replace(
        b"\r\nFrom:", b"\r\nList-Unsubscribe: <https://evil.example/u>\r\nFrom:", 1
    )
    assert not verifies(forged, signer)


def _replace_header(message: bytes, name: bytes, value: bytes) -> bytes:
    head, body = message.split(b"\r\n\r\n", 1)
    pattern = re.compile(rb"^" + name + rb":.*?(?=\r\n(?![ \t]))", re.M | re.S)
    new_head, n = pattern.subn(name + b": " + value, head, count=1)
    assert n == 1
    return new_head + b"\r\n\r\n" + body


def _insert_after_signature(message: bytes, field: bytes) -> bytes:
    head, body = message.split(b"\r\n\r\n", 1)
    lines = head.split(b"\r\n")
    at = next(i for i, line in enumerate(lines) if i and not line[:1].isspace())
    return b"\r\n".join([*lines[:at], field, *lines[at:]]) + b"\r\n\r\n" + body


TAMPERING: dict[str, Callable[[bytes], bytes]] = {
    "changed List-Unsubscribe": lambda m: _replace_header(
        m, b"List-Unsubscribe", b"<https://evil.example/unsubscribe/x>"
    ),
    "second List-Unsubscribe on top": lambda m: _insert_after_signature(
        m, b"List-Unsubscribe: <https://evil.example/unsubscribe/x>"
    ),
    "second List-Unsubscribe at the end": lambda m: m.replace(
        b"\r\n\r\n", b"\r\nList-Unsubscribe: <https://evil.example/u>\r\n\r\n", 1
    ),
    "second List-Unsubscribe-Post": lambda m: _insert_after_signature(
        m, b"List-Unsubscribe-Post: List-Unsubscribe=One-Click"
    ),
    "second From": lambda m: _insert_after_signature(m, b"From: Boss <boss@example.org>"),
    "changed Subject": lambda m: _replace_header(m, b"Subject", b"You won a prize"),
    "changed body": lambda m: m.replace(b"Sneads Ferry", b"Sneads Ferri", 1),
    "appended body": lambda m: m + b"Buy now: https://evil.example/\r\n",
}


@pytest.mark.parametrize("tamper", list(TAMPERING.values()), ids=list(TAMPERING))
def test_tampering_breaks_the_signature(
    signer: DkimSigner, tamper: Callable[[bytes], bytes]
) -> None:
    signed = signer.sign(digest_message())
    assert verifies(signed, signer)
    tampered = tamper(signed)
    assert tampered != signed
    assert not verifies(tampered, signer)


def test_relaxed_canonicalization_survives_trace_fields_and_refolding(signer: DkimSigner) -> None:
    signed = signer.sign(digest_message())
    # A relay adding trace fields and refolding whitespace is what relaxed/relaxed is for.
    relayed = b"Received: from relay.example by mx.example; Fri, 20 Nov 2026\r\n" + signed
    relayed = _replace_header(
        relayed, b"Subject", b"  " + _header_value(signed, b"Subject").strip()
    )
    assert relayed != signed
    assert verifies(relayed, signer)


def _header_value(message: bytes, name: bytes) -> bytes:
    headers, _ = dkim.rfc822_parse(message)
    value: bytes = next(v for n, v in headers if n.lower() == name.lower())
    return value.replace(b"\r\n", b"")


# --- equivalence with dkimpy's own signing ----------------------------------------------------


MESSAGES: dict[str, Callable[[], bytes]] = {
    "digest": digest_message,
    "confirmation": lambda: build_confirmation(SETTINGS, RECIPIENT, NOW, renderer=Renderer()),
    "whitespace and tabs": lambda: PLAIN,
    "no body": lambda: b"From: a@news.example.org\r\nSubject: x\r\n\r\n",
    "headers only": lambda: b"From: a@news.example.org\r\nSubject: x\r\n",
}


@pytest.mark.parametrize("bits", [1024, 2048])
@pytest.mark.parametrize("make", list(MESSAGES.values()), ids=list(MESSAGES))
def test_fast_path_is_byte_identical_to_dkimpy_sign(
    make: Callable[[], bytes],
    bits: int,
    rsa_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    key = rsa_key if bits == 2048 else rsa.generate_private_key(65537, 1024)
    message = make()
    fast = DkimSigner(DOMAIN, SELECTOR, key).signature_header(message, now=SIGNED_AT)
    slow = _dkimpy_header(message, key, monkeypatch)
    assert fast == slow  # RSASSA-PKCS1-v1_5 is deterministic: b= must match to the byte
    signer = DkimSigner(DOMAIN, SELECTOR, key)
    assert verifies(fast + message, signer)


def _dkimpy_header(
    message: bytes, key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> bytes:
    headers, _ = dkim.rfc822_parse(message)
    include = [
        n for n in SIGNED_FIELDS for _ in range(1 + sum(h.lower() == n for h, _v in headers))
    ]
    # dkimpy takes t= from time.time(); pin it so that the two signatures can be compared.
    monkeypatch.setattr(dkim, "time", SimpleNamespace(time=lambda: SIGNED_AT.timestamp()))
    signed: bytes = dkim.sign(
        message,
        SELECTOR.encode(),
        DOMAIN.encode(),
        pem(key, serialization.PrivateFormat.TraditionalOpenSSL),
        canonicalize=(b"relaxed", b"relaxed"),
        include_headers=include,
    )
    return signed


def test_one_signer_over_many_recipients_matches_dkimpy_for_each(
    rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The signer keeps each field's canonical form: the fields every message shares come
    # from it, the per-recipient ones (To, Message-ID, List-Unsubscribe) must not.
    signer = DkimSigner(DOMAIN, SELECTOR, rsa_key)
    composer = DigestComposer(SETTINGS, CONTENT, renderer=Renderer())
    messages = []
    for n in range(4):
        reader = Recipient(
            email=f"reader{n}@example.org",
            name=f"Reader {n}",
            uid=f"{n:022d}",
            message_id=f"<weekly.202611201200.42.{n:022d}@news.example.org>",
        )
        message = composer.message(reader, TOPICS[: 1 + n % 3], NOW)
        assert isinstance(message, CrlfOnly)
        messages.append(message)
    for message in [*messages, PLAIN, *messages]:
        fast = signer.signature_header(message, now=SIGNED_AT)
        assert fast == _dkimpy_header(message, rsa_key, monkeypatch)
        assert verifies(fast + message, signer)


def test_the_kept_canonical_fields_are_bounded(
    rsa_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mailer.compose.dkim import _canonical_field

    signer = DkimSigner(DOMAIN, SELECTOR, rsa_key)
    limit = _canonical_field.cache_info().maxsize
    assert limit is not None
    for n in range(12):
        message = PLAIN.replace(b"reader@", f"reader{n}@".encode())
        fast = signer.signature_header(message, now=SIGNED_AT)
        assert fast == _dkimpy_header(message, rsa_key, monkeypatch)
        assert _canonical_field.cache_info().currsize <= limit


def test_a_message_not_marked_crlf_only_is_still_checked(signer: DkimSigner) -> None:
    with pytest.raises(DkimError, match="CRLF line endings only"):
        signer.sign(PLAIN.replace(b"\r\n", b"\n", 1))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"a", b"b ", b" ", b"  ", b"\t", b"\r\n", b"\r", b"\n", b"=", b"x\t "]),
        max_size=60,
    )
)
def test_relaxed_body_equals_dkimpy_on_any_body(pieces: list[bytes]) -> None:
    body = b"".join(pieces)
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)


def awkward_article(n: int) -> Article:
    """Text whose relaxed form differs from it: runs of spaces and tabs, spaces at line ends."""
    return dataclasses.replace(
        article(n),
        guid=f"awkward-{n}",
        title=f"Two  spaces\tand a tab,   then three {n}   ",
        summary="Sentence one.  Sentence two.   \n\n\tIndented\t\tline.  \nLast line.   ",
        why_it_matters="  Leading spaces, trailing too.  ",
    )


@pytest.mark.parametrize(
    ("articles", "name"),
    [
        (CONTENT.articles, "Ann Reader"),
        (tuple(awkward_article(n) for n in range(6)), "Ann  \t Reader  "),
        (tuple(awkward_article(n) for n in range(1)), "Reader"),
    ],
    ids=["digest", "awkward-text-and-name", "one-article"],
)
def test_a_composer_message_brings_its_relaxed_body_and_signs_as_dkimpy_does(
    articles: tuple[Article, ...],
    name: str,
    rsa_key: rsa.RSAPrivateKey,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    content = dataclasses.replace(CONTENT, articles=articles)
    composer = DigestComposer(SETTINGS, content, renderer=Renderer())
    signer = DkimSigner(DOMAIN, SELECTOR, rsa_key)
    for n, topics in enumerate([TOPICS, TOPICS[:1], TOPICS[1:]]):
        reader = Recipient(
            email=f"reader{n}@example.org",
            name=name,
            uid=f"{n:022d}",
            message_id=f"<weekly.202611201200.42.{n:022d}@news.example.org>",
        )
        message = composer.message(reader, topics, NOW)
        if message is None:
            continue
        assert isinstance(message, CrlfOnly) and message.relaxed_body is not None
        body = message[message.index(b"\r\n\r\n") + 4 :]
        # The parts, put together, are the body canonicalized whole (dkimpy's own rules).
        assert b"".join(message.relaxed_body()) == Relaxed.canonicalize_body(body)
        fast = signer.signature_header(message, now=SIGNED_AT)
        assert fast == signer.signature_header(bytes(message), now=SIGNED_AT)
        assert fast == _dkimpy_header(message, rsa_key, monkeypatch)
        assert verifies(fast + message, signer)


def test_the_signer_hashes_the_parts_a_message_brings_not_its_body(signer: DkimSigner) -> None:
    message = digest_message()
    assert isinstance(message, CrlfOnly)
    parts = [b"other body", b"\r\n"]
    message.relaxed_body = lambda: parts
    body_hash = base64.b64encode(hashlib.sha256(b"".join(parts)).digest())
    assert tags(signer.sign(message))[b"bh"] == body_hash


def test_a_message_made_from_a_composer_message_canonicalizes_its_own_body(
    signer: DkimSigner,
) -> None:
    message = digest_message()
    assert isinstance(message, CrlfOnly) and message.relaxed_body is not None
    # A test copy or any rewrite is a new object: it does not carry the original's parts.
    rewritten = CrlfOnly(message.replace(b"Gate 1 closed", b"Gate 1 open"))
    assert rewritten.relaxed_body is None
    assert signer.sign(rewritten) != signer.sign(message)
    assert verifies(signer.sign(rewritten), signer)
    assert verifies(signer.sign(signer.sign(message)), signer)


# --- keys ------------------------------------------------------------------------------------


def test_generate_keypair_writes_a_private_pkcs1_key_and_returns_its_dns_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys" / "nl2026.pem"
    path.parent.mkdir()
    record = generate_keypair(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    data = path.read_bytes()
    assert data.startswith(b"-----BEGIN RSA PRIVATE KEY-----\n")  # PKCS#1, "traditional"
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    key = load_private_key(path)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    assert record == dns_record_value(key.public_key())
    assert record.startswith("v=DKIM1; k=rsa; p=")
    der = base64.b64decode(record.split("p=", 1)[1])
    published = serialization.load_der_public_key(der)
    assert isinstance(published, rsa.RSAPublicKey)
    assert published.public_numbers() == key.public_key().public_numbers()
    # dkimpy reads the key as written (PKCS#1 PEM), the form the compliance guide names.
    assert dkim.sign(PLAIN, b"s", b"news.example.org", data).startswith(b"DKIM-Signature:")


def test_generate_keypair_keeps_an_existing_key_and_checks_the_size(tmp_path: Path) -> None:
    path = tmp_path / "dkim.pem"
    generate_keypair(path, bits=1024)
    before = path.read_bytes()
    with pytest.raises(DkimKeyError, match="already exists"):
        generate_keypair(path)
    assert path.read_bytes() == before
    generate_keypair(path, bits=1024, overwrite=True)
    assert path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    for bits in (512, 1023, 8192):
        with pytest.raises(DkimError, match="1024–4096"):
            generate_keypair(tmp_path / f"k{bits}.pem", bits=bits)


def test_dns_helpers() -> None:
    settings = DkimSettings(domain=DOMAIN, selector=SELECTOR, private_key_file=Path("k.pem"))
    assert dns_record_name(settings) == "nl2026._domainkey.news.example.org"
    value = "v=DKIM1; k=rsa; p=" + "A" * 600
    line = zone_file_line(dns_record_name(settings), value)
    strings = re.findall(r'"([^"]*)"', line)
    assert "".join(strings) == value
    assert all(len(s) <= 255 for s in strings)
    assert line.startswith("nl2026._domainkey.news.example.org. IN TXT (")


@pytest.mark.parametrize(
    "fmt",
    [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8],
    ids=["pkcs1", "pkcs8"],
)
def test_pkcs1_and_pkcs8_keys_load_and_sign_alike(
    fmt: serialization.PrivateFormat, rsa_key: rsa.RSAPrivateKey, tmp_path: Path
) -> None:
    path = tmp_path / "key.pem"
    path.write_bytes(pem(rsa_key, fmt))
    path.chmod(0o600)
    settings = DkimSettings(domain=DOMAIN, selector=SELECTOR, private_key_file=path)
    loaded = DkimSigner.from_settings(settings, clock=lambda: SIGNED_AT)
    reference = DkimSigner(DOMAIN, SELECTOR, rsa_key, clock=lambda: SIGNED_AT)
    assert loaded.sign(PLAIN) == reference.sign(PLAIN)


def _encrypted(tmp: Path) -> bytes:
    key = rsa.generate_private_key(65537, 1024)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )


BAD_KEYS: dict[str, tuple[Callable[[Path], bytes | None], str]] = {
    "768-bit RSA": (lambda tmp: SMALL_KEY, "768 bits; DKIM needs 1024–4096"),
    "missing file": (lambda tmp: None, "cannot be read"),
    "not a key": (lambda tmp: b"hello\n", "is not a PEM private key"),
    "public key": (
        lambda tmp: (
            rsa.generate_private_key(65537, 1024)
            .public_key()
            .public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        ),
        "is not a PEM private key",
    ),
    "encrypted": (_encrypted, "is encrypted"),
    "EC key": (
        lambda tmp: pem(ec.generate_private_key(ec.SECP256R1()), serialization.PrivateFormat.PKCS8),
        "RSA \\(rsa-sha256\\) or Ed25519",
    ),
}


@pytest.mark.parametrize("make, message", list(BAD_KEYS.values()), ids=list(BAD_KEYS))
def test_unusable_keys_are_refused_naming_the_file(
    make: Callable[[Path], bytes | None], message: str, tmp_path: Path
) -> None:
    path = tmp_path / "dkim.pem"
    data = make(tmp_path)
    if data is not None:
        path.write_bytes(data)
    settings = DkimSettings(domain=DOMAIN, selector=SELECTOR, private_key_file=path)
    with pytest.raises(DkimKeyError, match=message) as caught:
        DkimSigner.from_settings(settings)
    assert isinstance(caught.value, ConfigError)
    assert isinstance(caught.value, MailerError)
    assert str(path) in str(caught.value)
    assert "[dkim].private_key_file" in str(caught.value)
    assert caught.value.file == path


def test_a_world_readable_key_is_used_with_a_warning(
    rsa_key: rsa.RSAPrivateKey, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "dkim.pem"
    path.write_bytes(pem(rsa_key, serialization.PrivateFormat.PKCS8))
    path.chmod(0o644)
    assert isinstance(load_private_key(path), rsa.RSAPrivateKey)
    assert "open to other users" in caplog.text


# --- messages that cannot be signed ----------------------------------------------------------


@pytest.mark.parametrize(
    "message, error",
    [
        (b"From: a@news.example.org\nSubject: x\n\nbody\n", "CRLF"),
        (b"From: a@news.example.org\r\nSubject: x\r\n\r\nbody\nmore\r\n", "CRLF"),
        (b"Subject: no sender\r\n\r\nbody\r\n", "without a From"),
        (b"\r\nFrom: a@news.example.org\r\n\r\n", "without a From"),
        (b"From: a@news.example.org\r\nnot a header line\r\n\r\nbody\r\n", "cannot sign"),
    ],
    ids=["LF only", "one bare LF", "no From", "empty header block", "broken header"],
)
def test_unsignable_messages_raise_dkim_error(
    signer: DkimSigner, message: bytes, error: str
) -> None:
    with pytest.raises(DkimError, match=error):
        signer.sign(message)


# --- Ed25519 (RFC 8463) ----------------------------------------------------------------------


def _verify_ed25519(signed: bytes, public: ed25519.Ed25519PublicKey) -> bool:
    """RFC 8463 verification with dkimpy's own header and body steps (its Ed25519 check needs
    PyNaCl, which is not installed): the signature is Ed25519 over the SHA-256 header hash."""
    d = dkim.DKIM(signed)
    sig, include, sigheaders = d.verify_headerprep(0)
    policy = dkim.CanonicalizationPolicy.from_c_value(sig[b"c"])
    body_hash = hashlib.sha256(policy.canonicalize_body(d.body)).digest()
    if base64.b64decode(sig[b"bh"]) != body_hash:
        return False
    hasher = hashlib.sha256()
    dkim.hash_headers(
        hasher, policy, policy.canonicalize_headers(d.headers), include, sigheaders[0], sig
    )
    try:
        public.verify(base64.b64decode(re.sub(rb"\s+", b"", sig[b"b"])), hasher.digest())
    except InvalidSignature:
        return False
    return True


def test_ed25519_keys_sign_ed25519_sha256(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    path = tmp_path / "ed.pem"
    path.write_bytes(pem(key, serialization.PrivateFormat.PKCS8))
    path.chmod(0o600)
    signer = DkimSigner.from_settings(
        DkimSettings(domain=DOMAIN, selector="ed", private_key_file=path),
        clock=lambda: SIGNED_AT,
    )
    signed = signer.sign(digest_message())
    assert tags(signed)[b"a"] == b"ed25519-sha256"
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert signer.dns_record() == "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode()
    assert _verify_ed25519(signed, key.public_key())
    assert not _verify_ed25519(
        signed.replace(b"Sneads Ferry", b"Sneads Ferri", 1), key.public_key()
    )
    tampered = _replace_header(signed, b"List-Unsubscribe", b"<https://evil.example/u>")
    assert not _verify_ed25519(tampered, key.public_key())


def test_signer_uses_its_clock_for_t(rsa_key: rsa.RSAPrivateKey) -> None:
    later = SIGNED_AT + timedelta(hours=1)
    signer = DkimSigner(DOMAIN, SELECTOR, rsa_key, clock=lambda: later)
    assert tags(signer.sign(PLAIN))[b"t"] == str(int(later.timestamp())).encode()


def test_a_signed_composer_message_stays_marked_crlf_only(signer: DkimSigner) -> None:
    message = digest_message()
    assert isinstance(message, SmtpReady)  # what the composer returns
    signed = signer.sign(message)
    assert isinstance(signed, SmtpReady) and is_crlf_only(signed)
    assert not has_leading_dot(signed)
    assert type(signer.sign(CrlfOnly(message))) is CrlfOnly  # only CRLF-only: stays so
    assert verifies(signed, signer)
    assert type(signer.sign(bytes(message))) is bytes  # unmarked input: the client checks it
