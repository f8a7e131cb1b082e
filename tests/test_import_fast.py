"""The CSV import's address normalizer (one validation per domain) equals normalize_address."""

from __future__ import annotations

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from mailer.errors import AddressError
from mailer.subscribers.addresses import normalize_address
from mailer.subscribers.csvfile import _ImportNormalizer

_ATOM = st.text(alphabet="abcXYZ09!#$%&'*+/=?^_`{|}~-", min_size=1, max_size=30)
_LOCAL = st.lists(_ATOM, min_size=1, max_size=4).map(".".join)
_DOMAINS = st.sampled_from(
    [
        "example.org",
        "Example.ORG",
        "mail.example.co.uk",
        "123.com",
        "xn--bcher-kva.ch",
        "b\u00fccher.ch",
        "localhost",
        "foo.test",
        "example.invalid",
        "a..b",
        "-a.com",
        "a.123",
        "example.org.",
        "x" * 63 + ".com",
        "x" * 64 + ".com",
        ("y" * 60 + ".") * 4 + "com",
    ]
)
ADDRESSES = st.one_of(
    st.builds(lambda local, domain: f"{local}@{domain}", _LOCAL, _DOMAINS),
    st.builds(lambda local, domain: f"  {local}@{domain} ", _LOCAL, _DOMAINS),
    st.text(alphabet='ab.@"() \u00e9x\r', max_size=24),
)


def outcome(normalize: object, raw: str) -> tuple[str, str]:
    try:
        return ("ok", normalize(raw))  # type: ignore[operator]
    except AddressError as exc:
        return ("error", exc.reason)


@settings(max_examples=500)
@given(st.lists(ADDRESSES, min_size=1, max_size=8))
@example(["a" * 64 + "@example.org", "a" * 65 + "@example.org"])
@example([".a@example.org", "a.@example.org", "a..b@example.org", "@example.org", "a@"])
def test_the_import_normalizer_agrees_with_normalize_address(addresses: list[str]) -> None:
    fast = _ImportNormalizer()  # one per import: domains cached across the addresses
    for raw in addresses:
        assert outcome(fast, raw) == outcome(normalize_address, raw), raw


@pytest.mark.parametrize("length", [250, 254, 255, 260])
def test_the_length_limit_holds_on_the_fast_path(length: int) -> None:
    domain = "example.org"
    local = "a" * 60
    padding = "b" * (length - len(local) - len(domain) - 2)
    raw = f"{local}@{padding}.{domain}" if padding else f"{local}@{domain}"
    assert outcome(_ImportNormalizer(), raw) == outcome(normalize_address, raw)
