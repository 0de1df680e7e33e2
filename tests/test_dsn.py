"""DSN parameters (RFC 3461): ``submit(..., envelope_id=)``. Against a relay without
DSN nothing is added; Postfix (which offers DSN) is tested in test_postfix_loop."""

from __future__ import annotations

import pytest
from smtpserver import FaultyServer

from dispatcher.loop.verp import envelope_id_for
from pool import SMTPPool
from pool.envelope import xtext

pytestmark = pytest.mark.timeout(30)


def test_xtext_encodes_plus_equals_space_and_non_ascii() -> None:
    assert xtext("job-1") == "job-1"
    assert xtext("a+b=c d") == "a+2Bb+3Dc+20d"
    assert xtext("é") == "+C3+A9"


def test_envelope_id_is_the_job_id_when_rfc_3461_allows_it() -> None:
    assert envelope_id_for("job-7") == "job-7"
    assert envelope_id_for("x" * 100) == "x" * 100
    assert envelope_id_for("+" * 40) is None  # 120 characters of xtext
    assert envelope_id_for("a\nb") is None
    assert envelope_id_for("é") is None  # ENVID is printable ASCII (RFC 3461 section 4.4)


async def test_a_relay_without_dsn_gets_no_dsn_parameters(server: FaultyServer) -> None:
    async with SMTPPool(hostname=server.host, port=server.port, size=1) as pool:
        result = await pool.submit(b"Subject: x\r\n\r\nHi\r\n", sender="bounces@example.org",
                                   recipients=["a@example.net"], envelope_id="job-1")
        assert result.accepted == ["a@example.net"]
        with pytest.raises(ValueError, match="envelope_id"):
            await pool.submit(b"Subject: x\r\n\r\nHi\r\n", sender="b@example.org", recipients=["a@example.net"],
                              envelope_id="+" * 40)
    assert server.messages[0].mail_options == []


def test_the_parameters_on_the_wire() -> None:
    from pool.envelope import prepare, with_envelope_id
    from pool.transaction import mail_parameters, rcpt_parameters

    envelope = with_envelope_id(prepare(b"Subject: x\r\n\r\nHi\r\n", sender="b@example.org",
                                        recipients=["a+b@example.net"]), "job 1=x")
    assert mail_parameters(envelope, envelope.recipients, smtputf8=False, eightbitmime=False, dsn=True) == [
        b"RET=HDRS", b"ENVID=job+201+3Dx"]
    assert mail_parameters(envelope, envelope.recipients, smtputf8=False, eightbitmime=False) == []
    assert rcpt_parameters("a+b@example.net") == [b"NOTIFY=FAILURE,DELAY", b"ORCPT=rfc822;a+2Bb@example.net"]
    assert rcpt_parameters("é@example.net") == [b"NOTIFY=FAILURE,DELAY"]
