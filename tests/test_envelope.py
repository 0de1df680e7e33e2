"""Building an envelope (pool/envelope.py), the pure part of every submit: what
``pool.prepare`` returns for what a caller gives, checked without a server."""

from __future__ import annotations

import pytest

from pool import Envelope, prepare
from pool.envelope import with_envelope_id, xtext

pytestmark = pytest.mark.timeout(10)


def test_the_message_id_is_the_header_field_never_a_line_of_the_body() -> None:
    # No header at all (the message starts with the blank line): the body's line is text.
    bare = prepare(b"\r\nMessage-ID: <in-the-body@example.org>\r\n", sender="a@example.org",
                   recipients=["b@example.net"])
    assert bare.message_id is None
    usual = prepare(b"Subject: x\r\nmessage-ID:   <id@example.org> \r\n\r\nMessage-ID: <body@example.org>\r\n",
                    sender="a@example.org", recipients=["b@example.net"])
    assert usual.message_id == "<id@example.org>"
    last = prepare(b"Subject: x\nMessage-ID: <last@example.org>", sender="a@example.org",
                   recipients=["b@example.net"])
    assert last.message_id == "<last@example.org>"
    assert last.content == b"Subject: x\r\nMessage-ID: <last@example.org>\r\n.\r\n"


def test_every_address_is_checked_and_each_recipient_kept_once() -> None:
    envelope = prepare(b"Subject: x\r\n\r\nhi\r\n", sender="a@example.org",
                       recipients=["b@example.net", "c@example.net", "b@example.net"])
    assert envelope.recipients == ("b@example.net", "c@example.net") and envelope.all_ascii
    utf8 = prepare(b"Subject: x\r\n\r\nhi\r\n", sender="a@example.org", recipients=["j\u00fcrgen@example.net"])
    assert not utf8.all_ascii
    with pytest.raises(ValueError, match=r"^recipients: address 'c@example\.net>' contains"):
        prepare(b"x\r\n", sender="a@example.org", recipients=["b@example.net", "c@example.net>"])
    with pytest.raises(ValueError, match=r"^sender: address 'a@example\.org\\r\\n' contains"):
        prepare(b"x\r\n", sender="a@example.org\r\n", recipients=["b@example.net"])
    with pytest.raises(ValueError, match=r"^recipients: address must be a string, got int"):
        prepare(b"x\r\n", sender="a@example.org", recipients=["b@example.net", 7])  # type: ignore[list-item]
    with pytest.raises(ValueError, match=r"^recipients: empty address"):
        prepare(b"x\r\n", sender="a@example.org", recipients=["b@example.net", ""])
    with pytest.raises(ValueError, match=r"^recipients: the message has no recipients"):
        prepare(b"x\r\n", sender="a@example.org", recipients=[])


def test_xtext_encodes_plus_equals_and_what_is_not_printable_ascii() -> None:
    assert xtext("job-12345") == "job-12345"
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext("j\u00fcrgen") == "j+C3+BCrgen"


def test_with_envelope_id_keeps_everything_else() -> None:
    envelope = prepare(b"Subject: x\r\n\r\nh\xc3\xa9\r\n", sender="a@example.org", recipients=["b@example.net"])
    tagged = with_envelope_id(envelope, "job-1")
    assert isinstance(tagged, Envelope) and tagged.envelope_id == "job-1"
    assert (tagged.sender, tagged.recipients, tagged.content, tagged.message_id, tagged.all_ascii, tagged.eight_bit) \
        == (envelope.sender, envelope.recipients, envelope.content, envelope.message_id, True, True)
