"""DKIM signing (RFC 6376): dkimpy's canonicalization and hashing, OpenSSL's private-key step.

Why not just ``dkim.sign``: dkimpy does the RSA private-key operation in pure Python, about
16 ms per RSA-2048 signature here, which would cap a signed send near 60 messages per second
per core; OpenSSL (through ``cryptography``) takes about 1 ms.

The seam. dkimpy 1.1 has no hook for the signing step: ``DKIM.sign`` parses the PEM key with
its own ASN.1 code on every call and ``DomainSigner.gen_header`` calls the module-level
``RSASSA_PKCS1_v1_5_sign`` directly, so overriding the RSA step means overriding both methods
anyway. ``signature_header`` below therefore follows ``DKIM.sign`` and ``gen_header`` step by
step, and every step that decides a byte of the result is dkimpy's own code, except one
faster equivalent:

- ``dkim.rfc822_parse`` splits header fields and body;
- ``CanonicalizationPolicy`` (relaxed/relaxed) canonicalizes the header fields (RFC 6376
  §3.4.2); the body (§3.4.4) goes through ``relaxed_body``, a faster equivalent of dkimpy's
  (property-tested against it);
- ``dkim.fold`` lays out the DKIM-Signature field, and ``dkim.RE_BTAG`` empties its ``b=``
  for hashing (§3.5, §3.7);
- ``dkim.hash_headers`` picks the signed instances bottom-up (§5.4.2) and hashes them, then the
  signature field itself without its trailing CRLF (§3.7).

Only the private-key operation on the resulting SHA-256 digest is ours: RSASSA-PKCS1-v1_5
(RFC 8017 §8.2.1, the ``rsa-sha256`` of RFC 6376 §3.3.1) or PureEdDSA Ed25519 over the digest
(RFC 8463 §3). PKCS#1 v1.5 signatures are deterministic, so ``tests/test_dkim.py`` checks that
``b=`` is byte for byte what ``dkim.sign`` produces for the same message and ``t=``, and that
every signature verifies with ``dkim.verify``.

The signed bytes are exactly the bytes sent: ``sign`` prepends one header field to the message
and changes nothing else, so the message must already use CRLF line endings.
"""

from __future__ import annotations

import base64
import collections
import functools
import hashlib
import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Final

import dkim
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from dkim.canonicalization import (
    CanonicalizationPolicy,
    correct_empty_body,
    strip_trailing_lines,
)

from mailer.clock import now as clock_now
from mailer.compose.wire import (
    CrlfOnly,
    SmtpReady,
    has_leading_dot,
    is_crlf_only,
    relax_lines,
)
from mailer.config.settings import DkimSettings, Settings
from mailer.errors import ConfigError, MailerError

log = logging.getLogger(__name__)

PrivateKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits (Gmail and Yahoo say the same,
# COMPLIANCE.md 3.2) and verifiers need only handle up to 4096, so a bigger key may not verify.
MIN_RSA_BITS: Final = 1024
MAX_RSA_BITS: Final = 4096
DEFAULT_RSA_BITS: Final = 2048

# COMPLIANCE.md §7 and RFC 6376 §5.4.1, plus RFC 8058 §4 (List-Unsubscribe and
# List-Unsubscribe-Post MUST be in h=) and Gmail's Feedback-ID. Each name is listed once more
# than it occurs (RFC 6376 §5.4.2, §8.15: "over-signing"), so a header added in transit, such
# as a second List-Unsubscribe, breaks the signature; an absent one is listed once, which makes
# adding it break the signature too.
SIGNED_FIELDS: Final = (
    b"from",
    b"reply-to",
    b"to",
    b"subject",
    b"date",
    b"message-id",
    b"mime-version",
    b"content-type",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
    b"feedback-id",
)

_SIGNED_NAMES: Final = frozenset(SIGNED_FIELDS)

SIGNATURE_FIELD: Final = b"DKIM-Signature"
# Never l= (RFC 6376 §8.2: anyone could append content under our signature); always t=.
_CANON: Final = CanonicalizationPolicy.from_c_value(b"relaxed/relaxed")


class DkimError(MailerError, ValueError):
    """A message cannot be signed (no From field, bare LF line endings, unparsable header)."""


class DkimKeyError(ConfigError):
    """The DKIM private key file is missing, unreadable, of the wrong kind or too small.

    ``file`` is the key file; the message names it and says what to do.
    """

    def __init__(self, file: Path, message: str) -> None:
        self.file = file
        super().__init__(message, path=str(file), key="dkim.private_key_file")


def signed_header_names(headers: Sequence[Sequence[bytes]]) -> tuple[bytes, ...]:
    """The ``h=`` list for ``headers`` ((name, value) pairs): every name of ``SIGNED_FIELDS``,
    each repeated once more than it occurs, in ``SIGNED_FIELDS`` order."""
    present = collections.Counter(header[0].lower() for header in headers)
    return tuple(name for name in SIGNED_FIELDS for _ in range(present[name] + 1))


def dns_record_name(settings: DkimSettings) -> str:
    """Where the public key is published: ``<selector>._domainkey.<domain>`` (RFC 6376 §3.6.2.1)."""
    return f"{settings.selector}._domainkey.{settings.domain}"


def dns_record_value(public_key: rsa.RSAPublicKey | ed25519.Ed25519PublicKey) -> str:
    """The TXT record value for ``public_key`` (RFC 6376 §3.6.1, RFC 8463 §4.2).

    RSA: the DER SubjectPublicKeyInfo, as ``openssl rsa -pubout`` and every DKIM tool publish
    it. Ed25519: the raw 32-byte key.
    """
    if isinstance(public_key, ed25519.Ed25519PublicKey):
        raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        return "v=DKIM1; k=ed25519; p=" + base64.b64encode(raw).decode("ascii")
    der = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return "v=DKIM1; k=rsa; p=" + base64.b64encode(der).decode("ascii")


def zone_file_line(name: str, value: str) -> str:
    """A zone-file TXT line for ``value``, cut into quoted strings of at most 255 octets.

    RFC 1035 §3.3.14: one character-string holds at most 255 octets, and a 2048-bit key does
    not fit in one; resolvers join the strings again (RFC 6376 §3.6.2.2).
    """
    chunks = [value[i : i + 255] for i in range(0, len(value), 255)]
    return f"{name}. IN TXT ( " + " ".join(f'"{chunk}"' for chunk in chunks) + " )"


def load_private_key(path: Path) -> PrivateKey:
    """Read a PEM private key: RSA (PKCS#1 or PKCS#8) of 1024–4096 bits, or Ed25519 (PKCS#8).

    Every failure is a ``DkimKeyError`` naming the file and the fix.
    """
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DkimKeyError(
            path, f"cannot be read: {exc.strerror} (create one with `mailer dkim keygen`)"
        ) from exc
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # cryptography's way of saying "this key needs a password"
        raise DkimKeyError(
            path, "is encrypted; the signer runs unattended, so store it unencrypted, mode 0600"
        ) from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise DkimKeyError(
            path,
            "is not a PEM private key (expected '-----BEGIN RSA PRIVATE KEY-----' or "
            "'-----BEGIN PRIVATE KEY-----')",
        ) from exc
    if isinstance(key, rsa.RSAPrivateKey):
        if not MIN_RSA_BITS <= key.key_size <= MAX_RSA_BITS:
            raise DkimKeyError(
                path,
                f"is an RSA key of {key.key_size} bits; DKIM needs {MIN_RSA_BITS}–{MAX_RSA_BITS} "
                f"bits (RFC 8301; Gmail and Yahoo require at least {MIN_RSA_BITS}, recommend "
                f"{DEFAULT_RSA_BITS}): make a new one with `mailer dkim keygen`",
            )
    elif not isinstance(key, ed25519.Ed25519PrivateKey):
        raise DkimKeyError(
            path, f"holds a {type(key).__name__}; DKIM signs with RSA (rsa-sha256) or Ed25519"
        )
    if os.name == "posix" and path.stat().st_mode & 0o077:
        log.warning("DKIM private key %s is open to other users: chmod 600 it", path)
    return key


@functools.lru_cache(maxsize=4096)
def _canonical_field(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    """dkimpy's relaxed canonical form of one header field. Kept: a digest's From, Reply-To,
    Subject, List-Id, MIME-Version, Content-Type ... repeat message after message, and only
    To, Date, Message-ID and List-Unsubscribe differ."""
    (canonical,) = _CANON.canonicalize_headers([(name, value)])
    return (bytes(canonical[0]), bytes(canonical[1]))


class DkimSigner:
    """Signs messages for one DKIM domain and selector: ``sign(message) -> signed message``.

    RSA keys sign with ``a=rsa-sha256``, Ed25519 keys with ``a=ed25519-sha256`` (RFC 8463;
    many receivers do not verify Ed25519 yet and COMPLIANCE.md 3.2 asks for rsa-sha256, so
    an Ed25519 key suits a second signer, not the only one). The signature is
    ``c=relaxed/relaxed``, carries ``t=`` and never ``l=``, and covers ``SIGNED_FIELDS``,
    over-signed. Thread-safe: it holds no per-message state.
    """

    def __init__(
        self,
        domain: str,
        selector: str,
        key: PrivateKey,
        *,
        clock: Callable[[], datetime] = clock_now,
    ) -> None:
        self.domain = domain
        self.selector = selector
        self.key = key
        self.clock = clock
        self.algorithm = b"rsa-sha256" if isinstance(key, rsa.RSAPrivateKey) else b"ed25519-sha256"
        self._d = domain.encode("ascii")
        self._s = selector.encode("ascii")

    @classmethod
    def from_settings(
        cls, settings: DkimSettings, *, clock: Callable[[], datetime] = clock_now
    ) -> DkimSigner:
        """The signer for ``[dkim]``, its key read (and checked) from ``private_key_file``."""
        key = load_private_key(settings.private_key_file)
        return cls(settings.domain, settings.selector, key, clock=clock)

    def dns_record(self) -> str:
        """The TXT record value the receivers must find for this key."""
        return dns_record_value(self.key.public_key())

    def sign(self, message: bytes, *, now: datetime | None = None) -> bytes:
        """``message`` with a DKIM-Signature field prepended: exactly the bytes to send.

        ``now`` is the signature time (``t=``, RFC 6376 §3.5); default: the clock.
        """
        header = self.signature_header(message, now=now)
        if isinstance(message, CrlfOnly) and is_crlf_only(header):
            # The header's lines begin with its name or a folding space, never with a dot.
            if isinstance(message, SmtpReady) and not has_leading_dot(header):
                return SmtpReady(header + message)
            return CrlfOnly(header + message)
        return header + message

    def signature_header(self, message: bytes, *, now: datetime | None = None) -> bytes:
        """The ``DKIM-Signature: ...\\r\\n`` field for ``message`` (what ``dkim.sign`` returns).

        Follows ``dkim.DKIM.sign`` and ``DomainSigner.gen_header`` of dkimpy 1.1 line by line,
        with the private-key step done by OpenSSL.
        """
        # A CrlfOnly message was checked by whoever made it (the composer checks its template
        # once and every line it fills in): counting its 30 KB again cost 40 µs a message.
        if not isinstance(message, CrlfOnly) and message.count(b"\n") != message.count(b"\r\n"):
            # A relay would turn a bare LF into CRLF (aiosmtplib does), and the bytes received
            # would then differ from the bytes signed.
            raise DkimError("the message must use CRLF line endings only (RFC 5322 §2.3)")
        # rfc822_parse splits the whole message into lines and joins the body again; with CRLF
        # line endings only (checked above) its body is exactly the bytes after the first empty
        # line, so it only needs to see the header block (about half the cost of signing).
        end = message.find(b"\r\n\r\n")
        head, body = (message, b"") if end < 0 else (message[: end + 4], message[end + 4 :])
        try:
            headers, _ = dkim.rfc822_parse(head)
        except dkim.MessageFormatError as exc:
            raise DkimError(f"cannot sign: {exc}") from exc
        include = signed_header_names(headers)
        if not any(name.lower() == b"from" for name, _ in headers):
            raise DkimError("cannot sign a message without a From field (RFC 6376 §5.4)")
        body_hash = base64.b64encode(_body_digest(message, body))
        when = now if now is not None else self.clock()
        fields = [
            (b"v", b"1"),
            (b"a", self.algorithm),
            (b"c", _CANON.to_c_value()),
            (b"d", self._d),
            (b"i", b"@" + self._d),
            (b"q", b"dns/txt"),
            (b"s", self._s),
            (b"t", str(int(when.timestamp())).encode("ascii")),
            (b"h", b" : ".join(include)),
            (b"bh", body_hash),
            # A 60-character placeholder makes dkim.fold put b= on a line of its own, so that
            # folding the real value later moves no whitespace before it (as dkimpy does).
            (b"b", b"0" * 60),
        ]
        namelen = len(SIGNATURE_FIELD)
        value = dkim.fold(_join(fields), namelen=namelen, linesep=b"\r\n")
        value = dkim.RE_BTAG.sub(rb"\1", value)  # §3.7: hash the field with an empty b=
        hasher = hashlib.sha256()
        dkim.hash_headers(
            hasher,
            _CANON,
            self._canonical_headers(headers),
            include,
            (SIGNATURE_FIELD, b" " + value),
            dict(fields),
        )
        fields[-1] = (b"b", base64.b64encode(self._sign_digest(hasher.digest())))
        signed: bytes = dkim.fold(_join(fields) + b"\r\n", namelen=namelen, linesep=b"\r\n")
        return SIGNATURE_FIELD + b": " + signed

    def _canonical_headers(self, headers: Sequence[Sequence[bytes]]) -> list[tuple[bytes, bytes]]:
        """``_CANON.canonicalize_headers(headers)`` for the fields ``h=`` can name, in order.

        The others are left out: ``dkim.hash_headers`` selects by name only, bottom-up among
        the fields of each name, so which instance it picks does not change. Each field's
        canonical form is dkimpy's own, computed once per distinct field and kept.
        """
        return [
            _canonical_field(bytes(name), bytes(value))
            for name, value in headers
            if name.lower() in _SIGNED_NAMES
        ]

    def _sign_digest(self, digest: bytes) -> bytes:
        """The one step dkimpy does in pure Python: sign the SHA-256 header hash.

        RSA: EMSA-PKCS1-v1_5 over the DigestInfo of the already computed SHA-256 hash
        (``Prehashed``), as ``dkim.crypto.RSASSA_PKCS1_v1_5_sign`` builds it. Ed25519: the
        32-byte hash itself is the message (RFC 8463 §3), as dkimpy's ``pk.sign(h.digest())``.
        """
        if isinstance(self.key, rsa.RSAPrivateKey):
            return self.key.sign(digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
        return self.key.sign(digest)


def _body_digest(message: bytes, body: bytes) -> bytes:
    """SHA-256 of ``body`` (``message``'s) in the relaxed canonical form: from the parts the
    composer canonicalized once (``CrlfOnly.relaxed_body``), or canonicalized here."""
    parts = message.relaxed_body if isinstance(message, CrlfOnly) else None
    if parts is None:
        return hashlib.sha256(relaxed_body(body)).digest()
    hasher = hashlib.sha256()
    for part in parts():
        hasher.update(part)
    return hasher.digest()


def relaxed_body(body: bytes) -> bytes:
    """The relaxed body canonicalization (RFC 6376 §3.4.4), equal to dkimpy's, 10× faster.

    dkimpy runs two regular-expression substitutions over the whole body, each matching every
    single space of it: about 0.9 ms for a 30 KB digest, as much as the RSA signature itself.
    ``relax_lines`` does the same with plain replacements; then trailing empty lines go and an
    empty body becomes empty (dkimpy's own helpers). A property test checks the two agree on
    arbitrary bodies.
    """
    tail: bytes = correct_empty_body(strip_trailing_lines(relax_lines(body)))
    return tail


def _join(fields: Sequence[tuple[bytes, bytes]]) -> bytes:
    return b"; ".join(b"=".join(field) for field in fields)


def generate_keypair(path: Path, bits: int = DEFAULT_RSA_BITS, *, overwrite: bool = False) -> str:
    """Write a new RSA private key to ``path`` and return its DNS TXT record value.

    The key is PKCS#1 ("traditional", ``BEGIN RSA PRIVATE KEY``) PEM, the form dkimpy and
    OpenDKIM read, written with mode 0600 through a temporary file so that no reader ever sees
    half a key. An existing file is kept unless ``overwrite``: replacing a key whose public half
    is in DNS breaks the signature of every message until DNS catches up.
    """
    if not MIN_RSA_BITS <= bits <= MAX_RSA_BITS:
        raise DkimError(f"DKIM RSA keys must have {MIN_RSA_BITS}–{MAX_RSA_BITS} bits, got {bits}")
    if path.exists() and not overwrite:
        raise DkimKeyError(path, "already exists; keep it, or choose another file or selector")
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    try:
        # mkstemp creates the file with mode 0600 already; the key never exists more readable.
        fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise DkimKeyError(path, f"cannot be written: {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(pem)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, 0o600)
        os.replace(temp, path)
    except OSError as exc:
        Path(temp).unlink(missing_ok=True)
        raise DkimKeyError(path, f"cannot be written: {exc.strerror}") from exc
    return dns_record_value(key.public_key())


def signer_for(settings: Settings) -> Callable[[bytes], bytes] | None:
    """The signing function for ``[dkim]``, or None; a bad key fails here, at start-up."""
    return DkimSigner.from_settings(settings.dkim).sign if settings.dkim else None
