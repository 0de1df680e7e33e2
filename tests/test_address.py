"""Strict addresses (docs/run.md): one mailbox a string, never a guess."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatcher.compose.address import Mailbox, _parse, parse_address, parse_mailbox, validated

AMBIGUOUS = [
    "bob@example.com <alice@example.net>",  # an address as the display name
    '"bob@example.com" <alice@example.net>',  # the same, quoted
    "alice@example.net, bob@example.net",  # two addresses
    "alice@example.net bob@example.net",
    "Ada <ada@example.net",  # unbalanced
    '"Ada <ada@example.net>',
    "Ada <<ada@example.net>>",
    "Ada <ada@example.net> trailing",
    '"quoted local"@example.com',  # only valid quoted
    "a..b@example.com",
    "ada@example.net (comment)",
    "Ada, Lovelace <ada@example.net>",  # an unquoted comma: a list to a lenient parser
    "ada@[127.0.0.1]",
    "ada@",
    "@example.net",
    "ada",
    "",
    "x" * 65 + "@example.net",
]


@pytest.mark.parametrize("value", AMBIGUOUS)
def test_ambiguous_mailbox_is_refused(value: str) -> None:
    with pytest.raises(ValueError):
        parse_mailbox(value)


@pytest.mark.parametrize(("value", "expected"), [
    ("ada@example.net", Mailbox("", "ada@example.net", False)),
    ("Ada Lovelace <ada@example.net>", Mailbox("Ada Lovelace", "ada@example.net", False)),
    ('"Lovelace, Ada" <ada@example.net>', Mailbox("Lovelace, Ada", "ada@example.net", False)),
    ("John Q. Public <jqp@example.net>", Mailbox("John Q. Public", "jqp@example.net", False)),
    ("Zoë Dupont <zoe@example.net>", Mailbox("Zoë Dupont", "zoe@example.net", False)),
    ("zoe@bücher.example", Mailbox("", "zoe@xn--bcher-kva.example", False)),  # IDNA: no SMTPUTF8 needed
    ("Zoë <zoë@example.net>", Mailbox("Zoë", "zoë@example.net", True)),
    ("Ada@Example.NET", Mailbox("", "Ada@example.net", False)),
])
def test_mailbox_is_parsed(value: str, expected: Mailbox) -> None:
    assert parse_mailbox(value) == expected


def test_envelope_address_takes_no_display_name() -> None:
    assert parse_address("ada@example.net").address == "ada@example.net"
    with pytest.raises(ValueError):
        parse_address("Ada <ada@example.net>")
    with pytest.raises(ValueError, match="CR or LF"):
        parse_address("ada@example.net\r\nRCPT TO:<x@example.org>")


_PIECES = st.sampled_from([
    "a", "Z", "0", "x.y", ".", "..", "-", "_", "+tag", "'", "=", "~", "!", "#", "{", "|", "%", "é", "ü", "日",
    "@", "@@", "<", ">", " ", "  ", '"', "\\", ",", ";", ":", "(", ")", "[", "]", "\t", "\x00", "\u200f",
    "example.net", "EXAMPLE.COM", "xn--bcher-kva.example", "bücher.example", "a-b.c", "-a.com", "a.-b.com",
    "ab--cd.com", "x.local", "y.test", "localhost", "a.b1", "a." * 40 + "com", "x" * 63, "x" * 70,
    "Ada", "Ada Lovelace", '"Ada"', '"A, B"', "Ada <", "> ", "<ada@example.net>", "ada@example.net",
])


@settings(max_examples=3000, deadline=None)
@given(st.lists(_PIECES, min_size=1, max_size=8).map("".join), st.booleans())
def test_shortcuts_agree_with_the_library(value: str, display_name: bool) -> None:
    """The cached shortcuts for plain addresses give exactly the library's verdict."""
    try:
        expected: Mailbox | None = validated(value, display_name)
    except ValueError:
        expected = None
    try:
        got: Mailbox | None = _parse.__wrapped__(value, display_name)
    except ValueError:
        got = None
    assert got == expected
