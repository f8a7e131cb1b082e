"""The shared text rules (mailer.text), as properties over any text."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mailer.text import MAX_INERT_URL, is_inert_url, is_plain_address, one_line, strip_controls

UNSAFE = {chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]} | {
    *map(chr, range(0x202A, 0x202F)),
    *map(chr, range(0x2066, 0x206A)),
}


def test_one_line_joins_whitespace_and_drops_controls() -> None:
    assert one_line("  Gate 2\r\n opens\tearly \x00Friday\u202e ") == "Gate 2 opens early Friday"


def test_one_line_cuts_at_the_limit_with_an_ellipsis() -> None:
    assert one_line("abcdef", limit=4) == "abc…"
    assert one_line("abcd", limit=4) == "abcd"


@given(st.text())
def test_one_line_is_one_safe_stripped_line(text: str) -> None:
    line = one_line(text)
    assert not set(line) & UNSAFE
    assert not any("\ud800" <= ch <= "\udfff" for ch in line)
    assert line == line.strip() and "  " not in line
    assert one_line(line) == line


@given(st.text(), st.integers(min_value=1, max_value=50))
def test_one_line_never_passes_its_limit(text: str, limit: int) -> None:
    assert len(one_line(text, limit=limit)) <= limit


CONTROLS = {chr(c) for c in [*range(0x00, 0x20), *range(0x7F, 0xA0)]} - {"\t", "\n"}


@given(st.text())
def test_strip_controls_keeps_lines_and_nothing_unsafe(text: str) -> None:
    kept = strip_controls(text)
    assert not set(kept) & CONTROLS
    assert not any("\ud800" <= ch <= "\udfff" for ch in kept)
    lines = text.replace("\r\n", "\n").replace("\r", "\n")
    assert kept.count("\n") == lines.count("\n")
    # Nothing else is dropped: every character that is neither a control nor a surrogate stays.
    assert kept == "".join(
        ch for ch in lines if ch not in CONTROLS and not "\ud800" <= ch <= "\udfff"
    )


def test_strip_controls_keeps_text_and_lines() -> None:
    assert strip_controls("Gate\u00a02\r\nopens\x00 early\rFriday\t!") == (
        "Gate\u00a02\nopens early\nFriday\t!"
    )


def test_plain_addresses() -> None:
    assert is_plain_address("ann.lee+news@example.org")
    assert is_plain_address("postmaster@localhost")
    for address in (
        '"ann lee"@example.org',
        "ann@exa mple.org",
        "ann@",
        "@x.org",
        "a..b@x.org",
        "ann@bücher.de",
        "ann@example.org\r\nRCPT TO:<x@y>",
    ):
        assert not is_plain_address(address), address


@given(
    st.from_regex(
        r"[a-z0-9!#$%&'*+/=?^_`{|}~-]{1,10}(\.[a-z0-9]{1,5}){0,2}@[a-z0-9-]{1,10}"
        r"(\.[a-z]{2,5}){0,2}",
        fullmatch=True,
    )
)
def test_every_dot_atom_is_plain(address: str) -> None:
    assert is_plain_address(address)


def test_an_inert_url_has_nothing_special_in_html_or_a_header() -> None:
    assert is_inert_url("https://news.example.org/a_b~c/(d)?e=1#f")
    assert is_inert_url("http://127.0.0.1:8000")
    for url in (
        "https://news.example.org/a b",
        "https://news.example.org/?a=1&b=2",
        'https://news.example.org/"><script>',
        "https://news.example.org/'",
        "https://bücher.de",
        "ftp://news.example.org",
        "https://news.example.org/\r\nBcc: x@y",
    ):
        assert not is_inert_url(url), url
    longest = "https://news.example.org/" + "a" * (MAX_INERT_URL - 25)
    assert len(longest) == MAX_INERT_URL and is_inert_url(longest)
    assert not is_inert_url(longest + "a")
