"""docs/library.md, promise by promise, against a real aiosmtpd server on 127.0.0.1.

Every test runs once per transaction mode: command-by-command (aiosmtplib) and, when
the server advertises it, RFC 2920 pipelining.
"""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import prometheus_client
import pytest
from conftest import make_message
from prometheus_client import CollectorRegistry
from smtpserver import FaultyServer

from pool import DeliveryError, PoolClosedError, RelayError, SendResult, SMTPPool, Withdrawn

pytestmark = pytest.mark.timeout(30)

MODES = {"command": False, "pipelined": None}


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_pool(server: FaultyServer, mode: str) -> Any:
    def factory(**kwargs: Any) -> SMTPPool:
        options: dict[str, Any] = {
            "hostname": server.host,
            "port": server.port,
            "size": 2,
            "timeout": 5.0,
            "backoff_base": 0.001,
            "backoff_max": 0.01,
            "pipelining": MODES[mode],
        }
        options.update(kwargs)
        return SMTPPool(**options)

    return factory


def on_the_wire(mode: str) -> int:
    """Messages one session holds while the server sits on an end-of-DATA reply:
    pipelined, the next message's envelope is already written (RFC 2920 section 3.2)."""
    return 2 if mode == "pipelined" else 1


def value(registry: CollectorRegistry, name: str, **labels: str) -> float:
    sample = registry.get_sample_value(name, labels)
    return 0.0 if sample is None else sample


# 1. Long-lived connections


async def test_messages_reuse_at_most_size_connections(server: FaultyServer, make_pool: Any) -> None:
    async with make_pool(size=4) as pool:
        results = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(200)))
    assert all(r.attempts == 1 for r in results)
    assert len(server.messages) == 200
    assert server.connections_made <= 4
    assert all(s.quit for s in server.sessions), "close() ends every session with QUIT"


async def test_a_message_its_submitter_no_longer_admits_is_not_sent(server: FaultyServer, make_pool: Any) -> None:
    """``admit`` is asked as the message is about to go on the wire, not at submit: a
    lease that lapses while the message waits in the queue withdraws it."""
    server.gate = asyncio.Event()
    lease = {"valid": True}
    async with make_pool(size=1, pipelining=False) as pool:
        first = asyncio.ensure_future(pool.submit(make_message(1)))
        await server.wait_for(lambda: server.data_started == 1)
        queued = asyncio.ensure_future(pool.submit(make_message(2), admit=lambda: lease["valid"]))
        lease["valid"] = False  # while the first message holds the only session
        server.gate.set()
        assert (await first).attempts == 1
        with pytest.raises(Withdrawn):
            await queued
    assert len(server.messages) == 1


async def test_admit_is_asked_after_the_session_opens(server: FaultyServer, make_pool: Any) -> None:
    """A slow connect (TLS, AUTH, a token fetch, a pause) lies between taking a message
    and sending it: the lease that lapses meanwhile must still withdraw it. Here the lease
    lapses the moment a session exists, so only a check made after connecting sees it."""
    async with make_pool(size=1, pipelining=False) as pool:
        with pytest.raises(Withdrawn):
            await pool.submit(make_message(1), admit=lambda: server.connections_made == 0)
    assert server.messages == []
    assert server.connections_made == 1


# 2. Never more than size open, reconnects included


async def test_never_more_than_size_connections_with_reconnects(server: FaultyServer, make_pool: Any) -> None:
    server.faults.close_after_messages = 3
    async with make_pool(size=3) as pool:
        results = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(60)))
        assert pool.max_open <= 3
    assert len(results) == 60
    assert server.connections_made >= 20, "every session was closed by 421 after 3 messages"
    assert server.max_concurrent <= 3


# 3. Permanent replies are not retried; transient ones are, with backoff


async def test_permanent_data_reply_is_not_retried(server: FaultyServer, make_pool: Any) -> None:
    server.faults.data_5xx = 1
    async with make_pool(size=1) as pool:
        with pytest.raises(DeliveryError) as failed:
            await pool.submit(make_message(1))
    assert failed.value.permanent is True
    assert failed.value.code == 554
    assert failed.value.attempts == 1
    assert server.sessions[0].commands.count("DATA") == 1
    assert server.messages == []


async def test_permanent_sender_refusal_is_not_retried(server: FaultyServer, make_pool: Any) -> None:
    server.faults.mail_code = "553 5.7.1 Sender not allowed"
    async with make_pool(size=1) as pool:
        with pytest.raises(DeliveryError) as failed:
            await pool.submit(make_message(1))
    assert (failed.value.code, failed.value.permanent, failed.value.attempts) == (553, True, 1)
    assert server.sessions[0].commands.count("MAIL") == 1


async def test_a_failed_submit_leaves_no_cycle_holding_the_message(server: FaultyServer, make_pool: Any) -> None:
    """The error's traceback holds submit's frame; were the job (whose future holds
    the error) still in it, the frame, the envelope and the message would wait for the
    cyclic collector: with large messages failing fast, hundreds of them at a time."""
    server.faults.mail_code = "553 5.7.1 Sender not allowed"
    async with make_pool(size=1) as pool:
        with pytest.raises(DeliveryError) as failed:
            await pool.submit(make_message(1))
    frames = []
    tb = failed.value.__traceback__
    while tb is not None:
        frames.append(tb.tb_frame)
        tb = tb.tb_next
    submit = [f for f in frames if f.f_code is SMTPPool.submit.__code__]
    assert submit and "job" not in submit[0].f_locals


async def test_transient_data_reply_is_retried_until_accepted(server: FaultyServer, make_pool: Any) -> None:
    server.faults.data_4xx = 2
    async with make_pool(size=1) as pool:
        result = await pool.submit(make_message(1))
    assert result.attempts == 3
    assert len(server.messages) == 1


async def test_transient_failures_give_up_after_max_attempts(server: FaultyServer, make_pool: Any) -> None:
    server.faults.data_4xx = 100
    async with make_pool(size=1, max_attempts=3) as pool:
        with pytest.raises(DeliveryError) as failed:
            await pool.submit(make_message(1))
    assert (failed.value.code, failed.value.permanent, failed.value.attempts) == (451, False, 3)
    assert failed.value.refused == {"rcpt1@example.net": (451, "4.3.0 Try again later")}


async def test_refused_connections_are_retried(server: FaultyServer, make_pool: Any) -> None:
    server.faults.refuse_connections = 2
    registry = CollectorRegistry()
    async with make_pool(size=1, registry=registry) as pool:
        result = await pool.submit(make_message(1))
    assert result.attempts == 1, "a refused connect is the relay's failure, not the message's"
    assert value(registry, "smtp_pool_connect_errors_total") == 2
    assert value(registry, "smtp_pool_connects_total") == 1


async def test_nothing_listening_is_a_transient_relay_error(make_pool: Any) -> None:
    probe = await FaultyServer().start()
    port = probe.port
    await probe.stop()  # the port is now closed: connects are refused
    async with make_pool(port=port, size=1, max_attempts=2, relay_down_timeout=0.2) as pool:
        with pytest.raises(RelayError) as failed:
            await pool.submit(make_message(1))
        assert failed.value.transient is True
        assert f"127.0.0.1:{port}" in str(failed.value)


async def test_greeting_421_is_retried(server: FaultyServer, make_pool: Any) -> None:
    server.faults.greeting_421 = 1
    async with make_pool(size=1) as pool:
        result = await pool.submit(make_message(1))
    assert result.attempts == 1
    assert len(server.messages) == 1


async def test_hung_reply_times_out_and_is_retried_on_a_new_connection(
    server: FaultyServer, make_pool: Any
) -> None:
    server.faults.hang = 1
    registry = CollectorRegistry()
    async with make_pool(size=1, timeout=0.3, registry=registry) as pool:
        result = await pool.submit(make_message(1))
    assert result.attempts == 2
    assert value(registry, "smtp_pool_ambiguous_total") == 1
    assert server.connections_made == 2
    assert len(server.messages) == 1


# 4. Per recipient


async def test_deferred_recipient_is_retried_alone(server: FaultyServer, make_pool: Any) -> None:
    server.faults.rcpt_defer["late@example.net"] = 1
    async with make_pool(size=1) as pool:
        result = await pool.submit(make_message(1, ["first@example.net", "late@example.net"]))
    assert sorted(result.accepted) == ["first@example.net", "late@example.net"]
    assert result.attempts == 2
    assert [m.rcpt_tos for m in server.messages] == [["first@example.net"], ["late@example.net"]]


async def test_refused_recipient_is_reported_and_others_delivered(server: FaultyServer, make_pool: Any) -> None:
    server.faults.rcpt["gone@example.net"] = "550 5.1.1 No such user"
    async with make_pool(size=1) as pool:
        result = await pool.submit(make_message(1, ["ok@example.net", "gone@example.net"]))
    assert result.accepted == ["ok@example.net"]
    assert result.refused == {"gone@example.net": (550, "5.1.1 No such user")}
    assert result.attempts == 1
    assert [m.rcpt_tos for m in server.messages] == [["ok@example.net"]]


async def test_all_recipients_refused_resets_and_keeps_the_session(server: FaultyServer, make_pool: Any) -> None:
    server.faults.rcpt["a@example.net"] = "550 5.1.1 No such user"
    server.faults.rcpt["b@example.net"] = "553 5.1.3 Bad address"
    async with make_pool(size=1) as pool:
        with pytest.raises(DeliveryError) as failed:
            await pool.submit(make_message(1, ["a@example.net", "b@example.net"]))
        after = await pool.submit(make_message(2))
    assert failed.value.permanent is True
    assert set(failed.value.refused) == {"a@example.net", "b@example.net"}
    assert "DATA" not in server.sessions[0].commands[:3]
    assert "RSET" in server.sessions[0].commands
    assert after.attempts == 1
    assert server.connections_made == 1


async def test_deferred_data_for_some_recipients_never_resends_to_accepted(
    server: FaultyServer, make_pool: Any
) -> None:
    server.faults.rcpt_defer["late@example.net"] = 2
    server.faults.rcpt["gone@example.net"] = "550 5.1.1 No such user"
    rcpts = ["a@example.net", "late@example.net", "gone@example.net", "b@example.net"]
    async with make_pool(size=1) as pool:
        result = await pool.submit(make_message(1, rcpts))
    assert sorted(result.accepted) == ["a@example.net", "b@example.net", "late@example.net"]
    assert set(result.refused) == {"gone@example.net"}
    assert all(count == 1 for count in server.deliveries().values())


# 5. Lost after end of DATA: ambiguous, retried, counted


async def test_lost_after_end_of_data_is_ambiguous_and_retried(server: FaultyServer, make_pool: Any) -> None:
    server.faults.drop_after_data = 1
    registry = CollectorRegistry()
    async with make_pool(size=1, registry=registry) as pool:
        result = await pool.submit(make_message(1))
    assert result.attempts == 2
    assert [m.reply_dropped for m in server.messages] == [True, False]
    assert value(registry, "smtp_pool_ambiguous_total") == 1
    assert value(registry, "smtp_pool_retries_total") == 1


# 6. 421 or disconnect replaces that connection only


async def test_421_replaces_only_that_connection(server: FaultyServer, make_pool: Any) -> None:
    server.faults.close_after_messages = 5
    async with make_pool(size=2) as pool:
        results = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(40)))
    assert len(server.messages) == 40
    assert all(count == 1 for count in server.deliveries().values())
    ended_by_421 = [s for s in server.sessions if not s.quit]
    # No session lost a message to another session's 421: each one ran its full course.
    assert all(s.messages == 5 for s in ended_by_421)
    assert sum(r.attempts - 1 for r in results) == len(ended_by_421)


async def test_disconnect_before_reply_is_retried_on_a_new_connection(
    server: FaultyServer, make_pool: Any
) -> None:
    server.faults.drop_before_data_reply_unrecorded = 1
    async with make_pool(size=1) as pool:
        result = await pool.submit(make_message(1))
    assert result.attempts == 2
    assert server.connections_made == 2
    assert len(server.messages) == 1


# 7. Cancellation


async def test_cancelled_before_taken_is_never_sent(server: FaultyServer, make_pool: Any, mode: str) -> None:
    server.gate = asyncio.Event()
    taken = on_the_wire(mode)
    async with make_pool(size=1) as pool:
        sending = [asyncio.create_task(pool.submit(make_message(i))) for i in range(taken)]
        queued = asyncio.create_task(pool.submit(make_message(99)))
        await server.wait_for(lambda: server.data_started == 1)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await queued
        server.gate.set()
        assert all(r.attempts == 1 for r in await asyncio.gather(*sending))
    assert [m.message_id for m in server.messages] == [f"<m{i}@test.local>" for i in range(taken)]


async def test_cancelled_after_taken_completes_and_session_stays_usable(
    server: FaultyServer, make_pool: Any
) -> None:
    server.gate = asyncio.Event()
    async with make_pool(size=1) as pool:
        first = asyncio.create_task(pool.submit(make_message(1)))
        await server.wait_for(lambda: server.data_started == 1)
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert first.cancelled(), "CancelledError reaches the caller"
        server.gate.set()
        second = await pool.submit(make_message(2))
    assert second.attempts == 1
    assert [m.message_id for m in server.messages] == ["<m1@test.local>", "<m2@test.local>"]
    assert server.connections_made == 1


# 8. close()


async def test_close_sends_everything_submitted_then_quits(server: FaultyServer, make_pool: Any) -> None:
    pool = make_pool(size=3, queue_size=10)
    tasks = [asyncio.create_task(pool.submit(make_message(i))) for i in range(50)]
    await asyncio.sleep(0)  # let every submit start (most wait on the full queue)
    await pool.close()
    results = await asyncio.gather(*tasks)
    assert all(isinstance(r, SendResult) for r in results)
    assert len(server.messages) == 50
    assert all(s.quit for s in server.sessions)
    assert pool.connections_open() == 0


async def test_close_without_drain_fails_waiting_and_finishes_in_flight(
    server: FaultyServer, make_pool: Any, mode: str
) -> None:
    server.gate = asyncio.Event()
    pool = make_pool(size=1)
    tasks = [asyncio.create_task(pool.submit(make_message(i))) for i in range(5)]
    await server.wait_for(lambda: server.data_started == 1)
    closing = asyncio.create_task(pool.close(drain=False))
    await asyncio.sleep(0)
    server.gate.set()
    await closing
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    taken = on_the_wire(mode)
    assert all(isinstance(o, SendResult) for o in outcomes[:taken])
    assert all(isinstance(o, PoolClosedError) for o in outcomes[taken:])
    assert len(server.messages) == taken
    assert server.sessions[0].quit


async def test_submit_after_close_raises_pool_closed(make_pool: Any) -> None:
    pool = make_pool()
    await pool.close()
    with pytest.raises(PoolClosedError):
        await pool.submit(make_message(1))


async def test_close_leaves_no_task_behind(server: FaultyServer, make_pool: Any) -> None:
    server.faults.data_4xx = 3
    before = asyncio.all_tasks()
    async with make_pool(size=4) as pool:
        await asyncio.gather(*(pool.submit(make_message(i)) for i in range(20)))
    leaked = [t for t in asyncio.all_tasks() - before if "pool" in repr(t.get_coro())]
    assert leaked == []


# 9. Rate limit


async def test_rate_limit_caps_the_pool_whatever_its_size(server: FaultyServer, make_pool: Any) -> None:
    rate, count = 40.0, 21
    async with make_pool(size=8, rate_limit=rate) as pool:
        started = time.monotonic()
        await asyncio.gather(*(pool.submit(make_message(i)) for i in range(count)))
        elapsed = time.monotonic() - started
    # count messages need count - 1 full intervals at the capped rate.
    assert elapsed >= (count - 1) / rate * 0.95


# Session life: idle close and recycling


async def test_idle_session_is_closed_with_quit(server: FaultyServer, make_pool: Any) -> None:
    async with make_pool(size=1, idle_timeout=0.05) as pool:
        await pool.submit(make_message(1))
        await server.wait_for(lambda: server.sessions[0].closed)
        assert server.sessions[0].quit
        for _ in range(100):  # the server may see the close a loop iteration before the pool does
            if pool.connections_open() == 0:
                break
            await asyncio.sleep(0)
        assert pool.connections_open() == 0
        await pool.submit(make_message(2))
    assert server.connections_made == 2


async def test_session_is_recycled_after_max_messages(server: FaultyServer, make_pool: Any) -> None:
    async with make_pool(size=1, max_messages_per_connection=3) as pool:
        for i in range(10):
            await pool.submit(make_message(i))
    assert [s.messages for s in server.sessions] == [3, 3, 3, 1]
    assert all(s.quit for s in server.sessions)


# Input


async def test_bad_input_raises_value_error_before_queueing(server: FaultyServer, make_pool: Any) -> None:
    async with make_pool() as pool:
        with pytest.raises(ValueError, match="no recipients"):
            msg = make_message(1)
            del msg["To"]
            await pool.submit(msg)
        with pytest.raises(ValueError, match="CR, LF"):
            await pool.submit(b"x", sender="a@x.org", recipients=["b@y.org\r\nRCPT TO:<c@z.org>"])
        with pytest.raises(ValueError, match="CR, LF"):
            await pool.submit(b"x", sender="a@x.org\nDATA", recipients=["b@y.org"])
        with pytest.raises(ValueError, match="required"):
            await pool.submit(b"x", recipients=["b@y.org"])
    assert server.connections_made == 0


async def test_bare_lf_dot_cannot_smuggle_a_second_message(server: FaultyServer, make_pool: Any) -> None:
    raw = (
        b"From: a@x.org\nTo: b@y.org\nSubject: smuggle\n\nline one\n.\nMAIL FROM:<evil@x.org>\n"
        b"RCPT TO:<victim@y.org>\nDATA\nevil\r.\r\n.hidden\n"
    )
    async with make_pool(size=1) as pool:
        result = await pool.submit(raw, sender="a@x.org", recipients=["b@y.org"])
    assert result.accepted == ["b@y.org"]
    assert len(server.messages) == 1
    content = server.messages[0].content
    assert b"MAIL FROM:<evil@x.org>" in content
    assert b".hidden" in content
    assert content.count(b"\n") == content.count(b"\r\n"), "CRLF line endings only"
    assert server.sessions[0].commands.count("MAIL") == 1


async def test_bcc_is_in_the_envelope_but_not_the_message(server: FaultyServer, make_pool: Any) -> None:
    msg = make_message(1, ["to@example.net"])
    msg["Cc"] = "cc@example.net"
    msg["Bcc"] = "hidden@example.net"
    async with make_pool(size=1) as pool:
        result = await pool.submit(msg)
    assert sorted(result.accepted) == ["cc@example.net", "hidden@example.net", "to@example.net"]
    assert b"hidden@example.net" not in server.messages[0].content
    assert msg["Bcc"] == "hidden@example.net", "the caller's message is not modified"


# Metrics


async def test_metrics_land_in_the_given_registry_only(server: FaultyServer, make_pool: Any) -> None:
    server.faults.data_4xx = 1
    server.faults.rcpt["gone@example.net"] = "550 5.1.1 No such user"
    registry = CollectorRegistry()
    async with make_pool(size=2, registry=registry) as pool:
        await asyncio.gather(*(pool.submit(make_message(i)) for i in range(5)))
        with pytest.raises(DeliveryError):
            await pool.submit(make_message(9, ["gone@example.net"]))
        assert value(registry, "smtp_pool_connections_open") >= 1
    assert value(registry, "smtp_pool_messages_total", outcome="sent") == 5
    assert value(registry, "smtp_pool_messages_total", outcome="failed") == 1
    assert value(registry, "smtp_pool_retries_total") == 1
    assert value(registry, "smtp_pool_send_seconds_count") == 6
    assert value(registry, "smtp_pool_queue_depth") == 0
    assert value(registry, "smtp_pool_connections_open") == 0
    assert prometheus_client.REGISTRY.get_sample_value("smtp_pool_messages_total", {"outcome": "sent"}) is None


# Chaos: every message ends with exactly one outcome that the server's record agrees with


async def test_chaos_loses_nothing_and_never_double_delivers(server: FaultyServer, make_pool: Any) -> None:
    server.faults.chaos = 0.05
    count = 2000
    registry = CollectorRegistry()
    messages = [
        make_message(i, [f"r{i}@example.net"] if i % 5 else [f"r{i}a@example.net", f"r{i}b@example.net"])
        for i in range(count)
    ]
    async with make_pool(size=8, max_attempts=8, registry=registry) as pool:
        outcomes = await asyncio.gather(*(pool.submit(m) for m in messages), return_exceptions=True)
    assert len(outcomes) == count
    assert all(isinstance(o, (SendResult, DeliveryError)) for o in outcomes), {type(o) for o in outcomes}

    delivered: dict[tuple[str | None, str], int] = {}
    acknowledged: dict[tuple[str | None, str], int] = {}
    for received in server.messages:
        for rcpt in received.rcpt_tos:
            key = (received.message_id, rcpt)
            delivered[key] = delivered.get(key, 0) + 1
            if not received.reply_dropped:
                acknowledged[key] = acknowledged.get(key, 0) + 1
    assert max(acknowledged.values()) == 1, "no recipient got an acknowledged message twice"
    sent = failed = 0
    for msg, outcome in zip(messages, outcomes, strict=True):
        mid = msg["Message-ID"]
        if isinstance(outcome, SendResult):
            sent += 1
            assert outcome.accepted
            for rcpt in outcome.accepted:
                assert acknowledged.get((mid, rcpt)) == 1, "every accepted recipient is in the server's record"
            for rcpt in outcome.refused:
                assert (mid, rcpt) not in acknowledged
        else:
            failed += 1
            for rcpt in outcome.refused:
                assert (mid, rcpt) not in acknowledged
    ambiguous = server.replies_dropped
    assert ambiguous > 0
    assert value(registry, "smtp_pool_ambiguous_total") == ambiguous
    assert value(registry, "smtp_pool_messages_total", outcome="sent") == sent
    assert sent + failed == count
    assert failed < count * 0.2
    print(f"chaos: {count} messages, {sent} sent, {failed} failed, {ambiguous} ambiguous, "
          f"{value(registry, 'smtp_pool_retries_total'):.0f} retries, {server.connections_made} connections")


def test_backoff_is_full_jitter_and_capped() -> None:
    import random

    from pool.retry import backoff_delay

    rng = random.Random(7)
    for retry in range(1, 12):
        ceiling = min(60.0, 0.5 * 2 ** (retry - 1))
        delays = [backoff_delay(retry, 0.5, 60.0, rng) for _ in range(200)]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.8, "jitter spans the whole window"
    assert backoff_delay(1000, 0.5, 60.0, rng) <= 60.0
    assert math.isfinite(backoff_delay(10**6, 0.5, 60.0, rng))


async def test_close_twice_and_escalating_to_no_drain(server: FaultyServer, make_pool: Any, mode: str) -> None:
    server.gate = asyncio.Event()
    pool = make_pool(size=1)
    taken = on_the_wire(mode)
    tasks = [asyncio.create_task(pool.submit(make_message(i))) for i in range(taken + 2)]
    await server.wait_for(lambda: server.data_started == 1)
    graceful = asyncio.create_task(pool.close())
    await asyncio.sleep(0)
    hurried = asyncio.create_task(pool.close(drain=False))
    server.gate.set()
    await asyncio.gather(graceful, hurried)
    await pool.close()
    outcomes = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(o, SendResult) for o in outcomes[:taken])
    assert [type(o) for o in outcomes[taken:]] == [PoolClosedError, PoolClosedError]


async def test_non_ascii_address_without_smtputf8_fails_only_that_message(
    server: FaultyServer, make_pool: Any
) -> None:
    async with make_pool(size=1) as pool:
        with pytest.raises(DeliveryError) as failed:
            await pool.submit(b"Subject: x\r\n\r\nbody\r\n", sender="a@example.org", recipients=["jürgen@example.net"])
        after = await pool.submit(make_message(2))
    assert failed.value.attempts == 1
    assert "jürgen@example.net" in failed.value.refused
    assert after.accepted == ["rcpt2@example.net"]


async def test_result_code_is_the_reply_that_accepted_the_message(server: FaultyServer, make_pool: Any) -> None:
    server.faults.rcpt_defer["late@example.net"] = 100
    async with make_pool(size=1, max_attempts=2) as pool:
        result = await pool.submit(make_message(1, ["ok@example.net", "late@example.net"]))
    assert result.accepted == ["ok@example.net"]
    assert result.refused == {"late@example.net": (450, "4.2.1 Mailbox busy, try later")}
    assert (result.code, result.response, result.attempts) == (250, "2.0.0 OK queued", 2)
