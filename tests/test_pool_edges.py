"""The pool under BDAT, the byte bound and admit(): a close that must not hang, a caller
callback that fails only its message, hand-built Envelopes, 421 after refused recipients."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import make_message
from smtpserver import FaultyServer

from pool import DeliveryError, PoolClosedError, PoolError, SMTPPool
from pool.budget import ByteBudget

pytestmark = pytest.mark.timeout(30)


def bdat_pool(port: int, **kwargs: Any) -> SMTPPool:
    options: dict[str, Any] = {"hostname": "127.0.0.1", "port": port, "size": 1, "timeout": 10.0,
                               "backoff_base": 0.001, "backoff_max": 0.01, "pipeline_depth": 4}
    options.update(kwargs)
    return SMTPPool(**options)


async def test_close_drain_sends_or_fails_a_submit_waiting_for_bytes() -> None:
    """close() (drain) must send every message already submitted, or at least end its
    submit: a submit waiting on max_bytes_in_flight is neither drained nor failed."""
    async with FaultyServer(chunking=True) as server:
        server.gate = asyncio.Event()
        pool = bdat_pool(server.port, max_bytes_in_flight=1000)
        first = asyncio.ensure_future(pool.submit(make_message(0, body="x" * 600 + "\n")))
        await server.wait_for(lambda: server.data_started == 1)
        second = asyncio.ensure_future(pool.submit(make_message(1, body="y" * 600 + "\n")))
        await asyncio.sleep(0.05)  # second waits for bytes: 600 + 600 > 1000
        closing = asyncio.ensure_future(pool.close())
        await asyncio.sleep(0.05)
        server.gate.set()
        await first
        await closing
        # close() has returned: every submit that started before it must be over.
        done, _ = await asyncio.wait({second}, timeout=3)
        assert done, "submit() waiting for bytes hangs forever after close() returned"
        second.result()  # sent (what close() promises), or at worst PoolClosedError


async def test_admit_that_raises_fails_only_its_own_message() -> None:
    """A submitter's admit() callback that raises must not crash the whole pool and fail
    the other messages (which were on the wire and may have been delivered)."""
    async with FaultyServer(chunking=True) as server:
        server.gate = asyncio.Event()
        async with bdat_pool(server.port) as pool:
            others = [asyncio.ensure_future(pool.submit(make_message(i))) for i in range(3)]
            await server.wait_for(lambda: server.data_started == 1)

            def admit() -> bool:
                raise RuntimeError("lease store unreachable")

            bad = asyncio.ensure_future(pool.submit(make_message(9), admit=admit))
            await asyncio.sleep(0.05)
            server.gate.set()
            results = await asyncio.gather(*others, return_exceptions=True)
            await asyncio.gather(bad, return_exceptions=True)
            later = await asyncio.gather(pool.submit(make_message(10)), return_exceptions=True)
        delivered = {mid for mid, _ in server.deliveries()}
    failed_but_delivered = [f"<m{i}@test.local>" for i, r in enumerate(results)
                            if isinstance(r, PoolError) and f"<m{i}@test.local>" in delivered]
    assert not failed_but_delivered, f"reported PoolError, yet the server has them: {failed_but_delivered}"
    assert [type(r).__name__ for r in results] == ["SendResult"] * 3, results
    assert not isinstance(later[0], BaseException), later


async def test_byte_budget_a_large_request_is_not_starved_by_small_ones() -> None:
    """One message larger than the bound must still go: it waits for held == 0, which
    a steady stream of small messages never lets happen."""
    budget = ByteBudget(100)
    stop = asyncio.Event()

    async def small() -> None:
        while not stop.is_set():
            await budget.acquire(30)
            await asyncio.sleep(0.01)
            budget.release(30)

    streams = [asyncio.ensure_future(small()) for _ in range(3)]
    for _ in streams:  # staggered: never all released at once
        await asyncio.sleep(0.003)
    large = asyncio.ensure_future(budget.acquire(150))
    try:
        done, _ = await asyncio.wait({large}, timeout=2)
        assert done, "a request larger than the budget starves while smaller ones keep coming"
    finally:
        stop.set()
        if large.done() and not large.cancelled():
            budget.release(150)
        large.cancel()
        await asyncio.gather(*streams, large, return_exceptions=True)


async def test_server_that_stops_answering_mid_pipeline_does_not_hang() -> None:
    async with FaultyServer(chunking=True) as server:
        server.faults.hang = 1  # message 0's BDAT LAST is never answered; 1-3 wait behind it
        async with bdat_pool(server.port, timeout=0.5) as pool:
            async with asyncio.timeout(15):
                results = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(4)),
                                               return_exceptions=True)
            ambiguous = pool.metrics.ambiguous
    assert all(not isinstance(r, BaseException) for r in results), results
    # message 0 hung after its BDAT was read: ambiguous; 1-3 were written too (at-least-once)
    assert ambiguous >= 1
    assert set(server.deliveries().values()) == {1} and len(server.deliveries()) == 4


async def test_close_without_drain_finishes_every_bdat_in_flight() -> None:
    async with FaultyServer(chunking=True) as server:
        server.gate = asyncio.Event()
        pool = bdat_pool(server.port, pipeline_depth=4)
        await pool.connect()
        sends = [asyncio.ensure_future(pool.submit(make_message(i))) for i in range(10)]
        await server.wait_for(lambda: server.data_started == 1)
        await asyncio.sleep(0.05)
        closing = asyncio.ensure_future(pool.close(drain=False))
        await asyncio.sleep(0.05)
        server.gate.set()
        async with asyncio.timeout(10):
            await closing
        results = await asyncio.gather(*sends, return_exceptions=True)
    sent = [r for r in results if not isinstance(r, BaseException)]
    closed = [r for r in results if isinstance(r, PoolClosedError)]
    assert len(sent) + len(closed) == 10, results
    assert len(sent) == len(server.messages) and set(server.deliveries().values()) == {1}



class _StopsReading:
    """Offers PIPELINING and CHUNKING, answers EHLO, then never reads nor answers again."""

    def __init__(self) -> None:
        self.port = 0
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> _StopsReading:
        self._server = await asyncio.start_server(self._session, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        await self._server.wait_closed()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        writer.write(b"220 x ESMTP\r\n")
        await reader.readline()
        writer.write(b"250-x\r\n250-PIPELINING\r\n250 CHUNKING\r\n")
        await writer.drain()
        await asyncio.Event().wait()  # never reads again: the client's writes back up


async def test_server_that_stops_reading_large_bdat_window_does_not_hang() -> None:
    async with _StopsReading() as server:
        async with bdat_pool(server.port, timeout=0.5, max_attempts=2, pipeline_depth=4) as pool:
            async with asyncio.timeout(20):
                results = await asyncio.gather(
                    *(pool.submit(make_message(i, body="z" * 2_000_000 + "\n")) for i in range(4)),
                    return_exceptions=True)
    assert all(isinstance(r, DeliveryError) for r in results), results


async def test_hand_built_envelope_with_non_ascii_recipient_is_bad_input_not_a_crash() -> None:
    """pool.Envelope is public and submit() sends one "as it is": all_ascii defaults to
    True whatever the addresses, so the non-ASCII recipient reaches envelope_commands,
    whose ValueError escapes Transaction.start and crashes every worker: the messages
    queued with it on the same session fail with PoolError and the pool is dead."""
    from pool import Envelope
    from pool.envelope import wire_content

    content = wire_content(b"From: a@example.org\r\nSubject: x\r\n\r\nhi\r\n")
    envelope = Envelope("a@example.org", ("j\u00fcrgen@example.net",), content, None)
    async with FaultyServer(chunking=True, smtputf8=False) as server:
        async with bdat_pool(server.port) as pool:
            await pool.connect()
            sends = [asyncio.ensure_future(pool.submit(make_message(i))) for i in range(2)]
            sends.append(asyncio.ensure_future(pool.submit(envelope)))
            results = await asyncio.wait_for(asyncio.gather(*sends, return_exceptions=True), 10)
            later = await asyncio.wait_for(asyncio.gather(pool.submit(make_message(5)), return_exceptions=True), 10)
    assert [type(r).__name__ for r in results[:2]] == ["SendResult", "SendResult"], results
    assert isinstance(results[2], (ValueError, DeliveryError)), results[2]
    assert not isinstance(later[0], BaseException), later


async def test_hand_built_envelope_never_sends_a_utf8_address_undeclared() -> None:
    """Behaviour 14: with SMTPUTF8 offered, the same Envelope's UTF-8 RCPT goes out on a
    MAIL without the SMTPUTF8 parameter (all_ascii=True by default): undeclared 8-bit."""
    from pool import Envelope
    from pool.envelope import wire_content

    content = wire_content(b"From: a@example.org\r\nSubject: x\r\n\r\nhi\r\n")
    envelope = Envelope("a@example.org", ("j\u00fcrgen@example.net",), content, None)
    async with FaultyServer(chunking=True, smtputf8=True) as server:
        async with bdat_pool(server.port) as pool:
            result = await asyncio.wait_for(asyncio.gather(pool.submit(envelope), return_exceptions=True), 10)
        mails = [m.mail_options for m in server.messages]
        commands = server.sessions[0].commands
    print(result, mails, commands)
    assert all("SMTPUTF8" in options for options in mails), mails
    assert isinstance(result[0], BaseException) or mails, result


@pytest.mark.parametrize("chunking", [True, False])
async def test_421_keeps_the_recipients_refused_before_it_on_both_paths(chunking: bool) -> None:
    """9d72d07 made a 421 keep the permanent refusals before it on the BDAT path; the
    pipelined DATA path (_start_pipelined) raises on the 421 before it records the RCPT
    replies, so a recipient refused 550 is retried and ends up with the 421 instead."""
    async with FaultyServer(chunking=chunking) as server:
        server.faults.rcpt["bad@example.net"] = "550 5.1.1 No such user"
        server.faults.rcpt["busy@example.net"] = "421 4.7.0 Too many connections, closing"
        async with bdat_pool(server.port, max_attempts=2) as pool:
            [result] = await asyncio.gather(
                pool.submit(make_message(0, ["bad@example.net", "busy@example.net"])), return_exceptions=True)
    assert isinstance(result, DeliveryError)
    assert result.refused["bad@example.net"][0] == 550, result.refused
