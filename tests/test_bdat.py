"""BDAT across messages (RFC 3030 CHUNKING over RFC 2920 PIPELINING): several whole
transactions on the wire per session, replies matched in order, and every promise
per message and per recipient still exact."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import make_message
from postfixserver import Postfix
from smtpserver import FaultyServer

from pool import DeliveryError, SMTPPool
from pool.envelope import wire_content
from pool.transaction import bdat_body


def bdat_pool(port: int, **kwargs: Any) -> SMTPPool:
    options: dict[str, Any] = {"hostname": "127.0.0.1", "port": port, "size": 1, "timeout": 10.0,
                               "backoff_base": 0.001, "backoff_max": 0.01, "pipeline_depth": 4}
    options.update(kwargs)
    return SMTPPool(**options)


@pytest.mark.parametrize("raw", [b"a\r\n", b".\r\n", b"..x\r\n.\r\n", b"x\r\n.y\r\n..\r\n.\r\nend\r\n"])
def test_bdat_body_is_the_message_without_dot_stuffing(raw: bytes) -> None:
    assert bdat_body(wire_content(raw)) == raw


async def test_several_transactions_are_in_flight_and_each_is_delivered_once() -> None:
    body = ".a line that starts with a dot\n..and two\n.\nend\n"
    async with FaultyServer(chunking=True) as server:
        async with bdat_pool(server.port) as pool:
            results = await asyncio.gather(*(pool.submit(make_message(i, body=body)) for i in range(24)))
    assert all(r.attempts == 1 for r in results)
    assert set(server.deliveries().values()) == {1} and len(server.deliveries()) == 24
    assert len(server.sessions) == 1
    commands = server.sessions[0].commands
    assert commands.count("BDAT") == 24 and "DATA" not in commands
    # When the server answered a BDAT LAST, later transactions were already in its buffer.
    assert max(server.sessions[0].ahead) > 0
    async with FaultyServer() as plain:  # the same messages over DATA arrive byte for byte alike
        async with bdat_pool(plain.port) as pool:
            await pool.submit(make_message(0, body=body))
    assert server.messages[0].content == plain.messages[0].content


async def test_refusals_with_others_in_flight_touch_only_their_own_message() -> None:
    async with FaultyServer(chunking=True) as server:
        server.faults.rcpt["bad@example.net"] = "550 5.1.1 No such user"
        async with bdat_pool(server.port) as pool:
            messages = [make_message(i) for i in range(12)]
            messages[3] = make_message(3, ["rcpt3@example.net", "bad@example.net"])
            messages[5] = make_message(5, ["bad@example.net"])  # every RCPT refused: the BDAT too
            server.faults.data_5xx = 1  # the first BDAT LAST (message 0) is refused for good
            results = await asyncio.gather(*(pool.submit(m) for m in messages), return_exceptions=True)
    first, fifth = results[0], results[5]
    assert isinstance(first, DeliveryError) and first.permanent and first.code == 554
    assert isinstance(fifth, DeliveryError) and fifth.permanent and fifth.code == 550
    third = results[3]
    assert not isinstance(third, BaseException)
    assert third.accepted == ["rcpt3@example.net"] and third.refused["bad@example.net"][0] == 550
    delivered = server.deliveries()
    assert set(delivered.values()) == {1}
    assert {rcpt for _, rcpt in delivered} == {f"rcpt{i}@example.net" for i in range(12) if i not in (0, 5)}
    assert all(not isinstance(r, BaseException) and r.attempts == 1 for i, r in enumerate(results) if i not in (0, 5))
    assert len(server.sessions) == 1  # an RSET, not a new session, clears the refused BDAT's state


async def test_lost_session_with_four_in_flight_makes_all_four_ambiguous_and_retries_them() -> None:
    async with FaultyServer(chunking=True) as server:
        server.gate = asyncio.Event()  # message 0's BDAT LAST is held: 1-3 wait in the server's buffer
        async with bdat_pool(server.port, pipeline_depth=4) as pool:
            sends = [asyncio.ensure_future(pool.submit(make_message(i))) for i in range(4)]
            await server.wait_for(lambda: server.data_started == 1)
            gate, server.gate = server.gate, None
            for protocol in list(server._protocols):
                server._abort(protocol)  # the session dies with four BDATs written, none answered
            gate.set()
            results = await asyncio.gather(*sends)
            ambiguous = pool.metrics.ambiguous
    assert ambiguous == 4
    assert [r.attempts for r in results] == [2, 2, 2, 2]
    assert set(server.deliveries().values()) == {1} and len(server.deliveries()) == 4


async def test_421_with_several_in_flight_leaves_the_ones_behind_it_unsent() -> None:
    async with FaultyServer(chunking=True) as server:
        server.faults.close_after_messages = 2  # MAIL of the third message: 421 and hang up
        async with bdat_pool(server.port, pipeline_depth=4) as pool:
            results = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(4)))
            ambiguous = pool.metrics.ambiguous
    # 0 and 1 were delivered; 2 was answered 421 (an attempt, not ambiguous); 3 was
    # written after the 421, which the server never read: no attempt, not ambiguous.
    assert [r.attempts for r in results] == [1, 1, 2, 1]
    assert ambiguous == 0
    assert set(server.deliveries().values()) == {1} and len(server.deliveries()) == 4


async def test_depth_one_or_no_chunking_keeps_data() -> None:
    async with FaultyServer(chunking=True) as server:
        async with bdat_pool(server.port, pipeline_depth=1) as pool:
            await asyncio.gather(*(pool.submit(make_message(i)) for i in range(3)))
    assert "BDAT" not in server.sessions[0].commands and server.sessions[0].commands.count("DATA") == 3


@pytest.mark.main_cf({"smtpd_recipient_restrictions": "reject_non_fqdn_recipient, permit_mynetworks, reject"})
async def test_real_postfix_takes_bdat_across_messages_with_refusals_in_flight(discarding_postfix: Postfix) -> None:
    # reject_non_fqdn_recipient: a recipient without a dot in its domain is refused (504).
    postfix = discarding_postfix
    async with bdat_pool(postfix.port, size=2, pipeline_depth=8) as pool:
        messages = [make_message(i) for i in range(40)]
        messages[7] = make_message(7, ["rcpt7@example.net", "nobody@nodot"])
        messages[9] = make_message(9, ["nobody@nodot"])  # no valid recipient: BDAT refused too
        # Postfix offers DSN: MAIL and every RCPT carry their DSN parameters with BDAT too.
        results = await asyncio.gather(*(pool.submit(m, envelope_id=f"env-{i}") for i, m in enumerate(messages)),
                                       return_exceptions=True)
    await postfix.until(lambda: sum(postfix.discarded().values()) >= 39 and len(postfix.sessions()) >= 2,
                        "39 messages discarded and 2 sessions ended")
    ninth = results[9]
    assert isinstance(ninth, DeliveryError) and ninth.permanent and ninth.code == 504
    seventh = results[7]
    assert not isinstance(seventh, BaseException) and seventh.refused["nobody@nodot"][0] == 504
    assert postfix.discarded() == {f"rcpt{i}@example.net": 1 for i in range(40) if i != 9}
    sessions = postfix.sessions()
    assert sum(s.get("bdat", 0) for s in sessions) == 40 and sum(s.get("data", 0) for s in sessions) == 0
    assert len(sessions) == 2
