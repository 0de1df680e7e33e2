"""What a hostile or failing relay does to the pool (docs/library.md promises 7, 8, 10-14),
against a real aiosmtpd server on 127.0.0.1, in both transaction modes."""

from __future__ import annotations

import asyncio
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import make_message
from prometheus_client import CollectorRegistry
from smtpserver import FaultyServer

from pool import DeliveryError, PoolClosedError, RelayError, SendResult, SMTPPool

pytestmark = pytest.mark.timeout(30)

MODES = {"command": False, "pipelined": None}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=sorted(MODES))
def mode(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def options(server: FaultyServer, mode: str, **kwargs: Any) -> dict[str, Any]:
    return {"hostname": server.host, "port": server.port, "size": 2, "timeout": 5.0, "backoff_base": 0.001,
            "backoff_max": 0.01, "pipelining": MODES[mode], **kwargs}


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


# Behaviour 13: replies that are not UTF-8, and DATA answered without 354


async def test_reply_that_is_not_utf8_is_kept_with_replacement(server: FaultyServer, mode: str) -> None:
    server.faults.data_reply_raw = b"250 2.0.0 Ok: re\xe7u"
    async with SMTPPool(**options(server, mode)) as pool:
        result = await pool.submit(make_message(1))
    assert result.response == "2.0.0 Ok: re\ufffdu"
    result.response.encode("utf-8")  # never a lone surrogate


async def test_data_answered_250_instead_of_354_is_not_a_delivery(server: FaultyServer, mode: str) -> None:
    server.faults.data_command_reply = "250 2.0.0 OK"
    async with SMTPPool(**options(server, mode, max_attempts=2)) as pool:
        with pytest.raises(DeliveryError) as failed:
            await pool.submit(make_message(1))
        server.faults.data_command_reply = None
        result = await pool.submit(make_message(2))  # the pool recovers on a fresh session
    assert failed.value.permanent is False
    assert failed.value.attempts == 2
    assert "instead of 354" in failed.value.response
    assert [m.message_id for m in server.messages] == ["<m2@test.local>"]
    assert result.attempts == 1


# Behaviour 14: SMTPUTF8 for any non-ASCII address


async def test_utf8_recipient_alone_uses_smtputf8(mode: str) -> None:
    async with FaultyServer(smtputf8=True) as server:
        async with SMTPPool(**options(server, mode)) as pool:
            await pool.submit(b"Subject: x\r\n\r\nhi\r\n", sender="a@example.org", recipients=["zoë@example.net"])
            await pool.submit(b"Subject: y\r\n\r\nhi\r\n", sender="a@example.org", recipients=["b@example.net"])
    utf8, ascii_only = server.messages
    assert utf8.rcpt_tos == ["zoë@example.net"]
    assert "SMTPUTF8" in utf8.mail_options
    assert "SMTPUTF8" not in ascii_only.mail_options


async def test_utf8_address_without_smtputf8_fails_permanently_and_keeps_the_session(
    server: FaultyServer, mode: str
) -> None:
    async with SMTPPool(**options(server, mode, size=1)) as pool:
        with pytest.raises(DeliveryError) as failed:
            await pool.submit(b"Subject: x\r\n\r\nhi\r\n", sender="a@example.org", recipients=["zoë@example.net"])
        await pool.submit(make_message(2))
    assert failed.value.permanent is True
    assert "SMTPUTF8" in failed.value.response
    assert failed.value.attempts == 1
    assert server.connections_made == 1
    assert len(server.messages) == 1


# Behaviour 11: a password is never sent in clear


async def test_password_is_not_sent_when_the_relay_offers_no_starttls(mode: str) -> None:
    async with FaultyServer(credentials=("user", "s3cret")) as server:  # no STARTTLS offered
        async with SMTPPool(**options(server, mode, username="user", password="s3cret")) as pool:
            with pytest.raises(RelayError) as failed:
                await pool.submit(make_message(1))
    assert failed.value.transient is False
    assert "STARTTLS" in str(failed.value)
    assert server.auth_attempts == [], "AUTH never reached the server"
    assert server.messages == []


# Behaviour 10: the relay is down, then back


async def test_relay_down_holds_the_queue_without_spending_attempts(mode: str) -> None:
    server = FaultyServer()
    await server.start()
    port = server.port
    await server.stop()  # nothing listens: every connect is refused
    registry = CollectorRegistry()
    pool = SMTPPool(hostname="127.0.0.1", port=port, size=2, timeout=5, backoff_base=0.01, backoff_max=0.05,
                    max_attempts=2, relay_down_timeout=20, pipelining=MODES[mode], registry=registry)
    async with pool:
        sends = [asyncio.create_task(pool.submit(make_message(i))) for i in range(10)]
        while (value(registry, "smtp_pool_connect_errors_total") or 0) < 6:  # bounded by the test timeout
            await asyncio.sleep(0.01)
        assert not any(task.done() for task in sends), "messages wait while the relay is down"
        revived = FaultyServer(port=port)
        await revived.start()
        try:
            results = await asyncio.gather(*sends)
        finally:
            await pool.close()
            await revived.stop()
    assert all(isinstance(r, SendResult) and r.attempts == 1 for r in results)
    assert len(revived.messages) == 10
    assert value(registry, "smtp_pool_relay_up") == 1.0


async def test_relay_down_for_the_timeout_fails_waiting_and_later_submits_then_recovers(mode: str) -> None:
    server = FaultyServer()
    await server.start()
    port = server.port
    await server.stop()
    registry = CollectorRegistry()
    pool = SMTPPool(hostname="127.0.0.1", port=port, size=2, timeout=5, backoff_base=0.01, backoff_max=0.05,
                    relay_down_timeout=0.3, pipelining=MODES[mode], registry=registry)
    async with pool:
        outcomes = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(5)), return_exceptions=True)
        assert all(isinstance(o, RelayError) and o.transient for o in outcomes), outcomes
        assert value(registry, "smtp_pool_relay_up") == 0.0
        with pytest.raises(RelayError):
            await pool.submit(make_message(9))  # at once, while down
        revived = FaultyServer(port=port)
        await revived.start()
        try:
            async with asyncio.timeout(5):  # the pool probes every backoff_max seconds
                while pool.relay_error is not None:
                    await asyncio.sleep(0.01)
            result = await pool.submit(make_message(10))
        finally:
            await pool.close()
            await revived.stop()
    assert result.attempts == 1
    assert [m.message_id for m in revived.messages] == ["<m10@test.local>"]


# Behaviour 12: throttling


async def test_throttling_reply_halves_the_rate_and_the_message_is_retried(server: FaultyServer, mode: str) -> None:
    registry = CollectorRegistry()
    async with SMTPPool(**options(server, mode, size=1, rate_limit=100.0, registry=registry)) as pool:
        assert value(registry, "smtp_pool_rate_current") == 100.0
        # What SES answers when over its sending rate.
        server.faults.mail_code = "454 Throttling failure: Maximum sending rate exceeded."
        server.faults.mail_code_times = 1
        result = await pool.submit(make_message(1))
        assert value(registry, "smtp_pool_rate_current") == 50.0
        assert value(registry, "smtp_pool_replies_total", code="250") == 1.0
    assert result.attempts == 2


async def test_unlimited_pool_reports_infinite_rate(server: FaultyServer, mode: str) -> None:
    registry = CollectorRegistry()
    async with SMTPPool(**options(server, mode, registry=registry)) as pool:
        await pool.submit(make_message(1))
        assert value(registry, "smtp_pool_rate_current") == math.inf
        assert (value(registry, "smtp_pool_transaction_seconds_count") or 0) == 1.0


# Behaviours 7 and 8: close and terminate never hang; every task has an owner


async def test_close_without_drain_after_close_does_not_hang(server: FaultyServer, mode: str) -> None:
    server.gate = asyncio.Event()
    pool = SMTPPool(**options(server, mode, size=1))
    sends = [asyncio.create_task(pool.submit(make_message(i))) for i in range(20)]
    await server.wait_for(lambda: server.data_started >= 1)
    first = asyncio.create_task(pool.close())  # drains: waits for the gate
    await asyncio.sleep(0)
    second = asyncio.create_task(pool.close(drain=False))  # the runner's second Ctrl-C
    await asyncio.sleep(0)
    server.gate.set()
    async with asyncio.timeout(10):
        await asyncio.gather(first, second)
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
    sent = [o for o in outcomes if isinstance(o, SendResult)]
    closed = [o for o in outcomes if isinstance(o, PoolClosedError)]
    assert len(sent) + len(closed) == 20 and sent
    assert len(server.messages) == len(sent)


async def test_cancelled_close_leaves_the_pool_closable(server: FaultyServer, mode: str) -> None:
    server.gate = asyncio.Event()
    pool = SMTPPool(**options(server, mode, size=1))
    sends = [asyncio.create_task(pool.submit(make_message(i))) for i in range(5)]
    await server.wait_for(lambda: server.data_started >= 1)
    closing = asyncio.create_task(pool.close())
    await asyncio.sleep(0)
    closing.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closing
    server.gate.set()
    async with asyncio.timeout(10):
        await pool.close()  # neither hangs nor raises CancelledError
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
    assert all(isinstance(o, (SendResult, PoolClosedError)) for o in outcomes), outcomes
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("smtp-pool")] == []


async def test_terminate_fails_everything_at_once(server: FaultyServer, mode: str) -> None:
    server.gate = asyncio.Event()
    pool = SMTPPool(**options(server, mode, size=2, rate_limit=5))
    sends = [asyncio.create_task(pool.submit(make_message(i))) for i in range(50)]
    await server.wait_for(lambda: server.data_started >= 1)
    pool.terminate()
    async with asyncio.timeout(5):
        await pool.close()
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
    assert all(isinstance(o, PoolClosedError) for o in outcomes), outcomes
    assert pool.connections_open() == 0
    assert [t for t in asyncio.all_tasks() if t.get_name().startswith("smtp-pool")] == []


# Logging: nothing on stdout by default, and a closed stdout never stops delivery


SCRIPT = """
import asyncio, sys
import structlog
from pool import SMTPPool
if sys.argv[2] == "structlog-stdout":
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(file=sys.stdout))

async def main():
    # validate_certs=False: a warning, which an unconfigured application must not see either
    async with SMTPPool("127.0.0.1", int(sys.argv[1]), size=2, idle_timeout=0.01, validate_certs=False) as pool:
        for i in range(20):
            await pool.submit(b"Subject: x\\r\\n\\r\\nhi\\r\\n", sender="a@example.org", recipients=[f"r{i}@example.net"])
            await asyncio.sleep(0.002)  # let idle sessions close: more log lines
asyncio.run(main())
"""


@pytest.mark.parametrize("logging_setup", ["nothing", "structlog-stdout"])
async def test_library_logs_nothing_on_stdout_and_survives_a_closed_stdout(
    server: FaultyServer, logging_setup: str, tmp_path: Path
) -> None:
    script = tmp_path / "send.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    if logging_setup == "nothing":
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), str(server.port), logging_setup,
                                                    env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        async with asyncio.timeout(20):
            out, err = await proc.communicate()
        assert proc.returncode == 0
        assert out == b"", "the library printed on the application's stdout"
        assert err == b"", "the library printed on stderr through logging's last resort"
    else:
        read, write = os.pipe()
        os.close(read)  # `python send.py | head -0`: stdout is a closed pipe
        proc = await asyncio.create_subprocess_exec(sys.executable, str(script), str(server.port), logging_setup,
                                                    env=env, stdout=write, stderr=subprocess.DEVNULL)
        os.close(write)
        async with asyncio.timeout(20):
            await proc.wait()
    assert len(server.messages) == 20


# Several relays


async def test_router_spreads_by_weight_and_fails_over_from_a_refusing_relay() -> None:
    from pool import SMTPRouter

    async with FaultyServer() as main, FaultyServer() as backup, \
            FaultyServer(credentials=("user", "right")) as broken:
        registry = CollectorRegistry()

        def pool(server: FaultyServer, **kwargs: Any) -> SMTPPool:
            return SMTPPool(**options(server, "pipelined", **kwargs))

        router = SMTPRouter({"main": pool(main), "backup": pool(backup)}, weights={"main": 3, "backup": 1},
                            registry=registry)
        async with router:
            results = await asyncio.gather(*(router.submit(make_message(i)) for i in range(400)))
            pinned = await router.submit(make_message(99), relay="backup")
        assert [r.relay for r in results].count("main") == 300
        assert pinned.relay == "backup"
        assert value(registry, "smtp_pool_messages_total", outcome="sent", relay="main") == 300.0
        assert value(registry, "smtp_pool_messages_total", outcome="sent", relay="backup") == 101.0

        failover = SMTPRouter({
            "broken": pool(broken, start_tls=False, username="user", password="wrong"), "backup": pool(backup)})
        async with failover:
            moved = await asyncio.gather(*(failover.submit(make_message(100 + i)) for i in range(10)))
        assert all(r.relay == "backup" for r in moved)
        assert failover.pools["broken"].relay_error is not None
        assert len(backup.messages) == 111


async def test_router_moves_messages_off_a_relay_killed_mid_run() -> None:
    from pool import SMTPRouter

    async with FaultyServer() as survivor:
        doomed = await FaultyServer().start()
        doomed.faults.delay = 0.002
        router = SMTPRouter({
            "doomed": SMTPPool(**options(doomed, "pipelined", relay_down_timeout=0.3)),
            "survivor": SMTPPool(**options(survivor, "pipelined")),
        })
        async with router:
            sends = [asyncio.create_task(router.submit(make_message(i))) for i in range(300)]
            await doomed.wait_for(lambda: len(doomed.messages) >= 20)
            await doomed.stop()
            results = await asyncio.gather(*sends)
    delivered = {m.message_id for m in doomed.messages} | {m.message_id for m in survivor.messages}
    assert delivered == {f"<m{i}@test.local>" for i in range(300)}
    assert {r.relay for r in results} == {"doomed", "survivor"}
    assert all(r.relay == "survivor" for r in results[-50:])


# The throttling classifier on what providers actually answer


@pytest.mark.parametrize(("code", "text", "throttling"), [
    (421, "4.7.0 Try again later, closing connection. (EHLO) s12-20020a05.2 - gsmtp", True),  # Gmail
    (421, "4.7.28 Our system has detected an unusual rate of unsolicited mail originating from your IP address.",
     True),  # Gmail
    (450, "4.2.1 The user you are trying to contact is receiving mail at a rate that prevents additional "
          "messages from being delivered.", True),  # Gmail
    (454, "Throttling failure: Maximum sending rate exceeded.", True),  # Amazon SES
    (454, "Throttling failure: Daily message quota exceeded.", True),  # Amazon SES
    (451, "4.7.500 Server busy. Please try again later from [203.0.113.7].", True),  # Microsoft 365
    (451, "4.7.650 The mail server [203.0.113.7] has been temporarily rate limited due to IP reputation.",
     True),  # Microsoft 365
    (421, "4.7.0 mail.example.com Error: too many connections from 203.0.113.7", True),  # Postfix anvil
    (450, "4.7.1 Error: too many recipients from 203.0.113.7", True),  # Postfix anvil
    (421, "4.7.0 [TSS04] Messages from 203.0.113.7 temporarily deferred due to unexpected volume", True),  # Yahoo
    (451, "4.3.0 Try again later", False),
    (450, "4.2.1 Mailbox busy, try later", False),
    (421, "4.3.2 Service not available, closing transmission channel", False),
    (452, "4.2.2 Mailbox full", False),
    (550, "5.7.1 Daily sending limit exceeded", False),  # permanent: not retried at all
    (250, "2.0.0 Ok: rate 1/s", False),
])
def test_throttling_classifier_on_provider_replies(code: int, text: str, throttling: bool) -> None:
    from pool.retry import is_throttling

    assert is_throttling(code, text) is throttling


# Regressions found by review: each of these hung, lost or misreported a message before


async def test_close_without_drain_while_backoff_timers_are_being_created_never_hangs(server: FaultyServer) -> None:
    import random

    for seed in range(6):
        rng = random.Random(seed)
        for i in range(30):
            server.faults.rcpt_defer[f"slow{i}@example.net"] = 1
        pool = SMTPPool(hostname=server.host, port=server.port, size=4, backoff_base=0.2, timeout=5)
        sends = [asyncio.create_task(pool.submit(b"Subject: x\r\n\r\nhi", sender="a@example.org",
                                                 recipients=["ok@example.net", f"slow{i}@example.net"]))
                 for i in range(30)]
        await asyncio.sleep(rng.uniform(0.0, 0.1))
        async with asyncio.timeout(5):
            await pool.close(drain=False)  # a timer cancelled before its first step still ends its job
            outcomes = await asyncio.gather(*sends, return_exceptions=True)
        assert all(isinstance(o, (SendResult, PoolClosedError)) for o in outcomes), outcomes


@pytest.mark.parametrize("size", [1, 2, 8])
async def test_probe_finds_the_relay_back_whatever_the_pool_size(size: int) -> None:
    dead = await FaultyServer().start()
    port = dead.port
    await dead.stop()
    pool = SMTPPool(hostname="127.0.0.1", port=port, size=size, relay_down_timeout=0.2, backoff_base=0.02,
                    backoff_max=0.1, idle_timeout=None, timeout=2)
    async with pool:
        with pytest.raises(RelayError):
            await pool.submit(make_message(1))
        async with FaultyServer(port=port) as server:
            async with asyncio.timeout(5):
                while pool.relay_error is not None:  # the first slot probes every backoff_max
                    await asyncio.sleep(0.02)
            await pool.submit(make_message(2))
    assert [m.message_id for m in server.messages] == ["<m2@test.local>"]


async def test_a_deferred_recipient_keeps_its_own_reply_when_the_pool_stops(server: FaultyServer) -> None:
    server.faults.rcpt["bad@example.net"] = "550 5.1.1 No such user"
    server.faults.rcpt_defer["slow@example.net"] = 100
    pool = SMTPPool(hostname=server.host, port=server.port, size=1, backoff_base=5, timeout=5)
    send = asyncio.create_task(pool.submit(b"Subject: x\r\n\r\nhi", sender="a@example.org",
                                           recipients=["slow@example.net", "bad@example.net"]))
    async with asyncio.timeout(5):
        while not pool._timers:  # the deferred recipient is backing off
            await asyncio.sleep(0.005)
        await pool.close(drain=False)
        (outcome,) = await asyncio.gather(send, return_exceptions=True)
    # Not a permanent DeliveryError: slow@ got a 450, never the 550 of bad@.
    assert isinstance(outcome, PoolClosedError), outcome


async def test_a_worker_that_dies_fails_what_it_holds(server: FaultyServer) -> None:
    class BrokenLimiter:
        async def acquire(self) -> None:
            raise RuntimeError("MISCONF Redis is unable to persist to disk")

    pool = SMTPPool(hostname=server.host, port=server.port, size=1, timeout=5, rate_limiter=BrokenLimiter())
    async with asyncio.timeout(5):
        with pytest.raises(Exception) as failed:
            await pool.submit(make_message(1))
        await pool.close()
    assert "MISCONF" in str(failed.value)
    assert server.messages == []


@pytest.mark.parametrize("prepared", [False, True], ids=["bytes", "envelope"])
async def test_router_never_sends_a_permanently_refused_recipient_through_another_relay(prepared: bool) -> None:
    from pool import SMTPRouter, prepare

    async with FaultyServer() as backup:
        first = await FaultyServer().start()
        first.faults.rcpt["bad@example.net"] = "550 5.1.1 No such user"
        first.faults.rcpt_defer["slow@example.net"] = 100
        kw: dict[str, Any] = {"size": 1, "relay_down_timeout": 0.3, "backoff_base": 0.3, "backoff_max": 0.5,
                              "timeout": 2}
        router = SMTPRouter({"first": SMTPPool("127.0.0.1", first.port, **kw),
                             "backup": SMTPPool("127.0.0.1", backup.port, **kw)}, weights={"first": 100, "backup": 1})
        async with asyncio.timeout(15), router:
            envelope = {"sender": "a@example.org", "recipients": ["bad@example.net", "slow@example.net"]}
            if prepared:  # an Envelope is narrowed to the recipients left, not sent with its own
                send = asyncio.create_task(router.submit(prepare(b"Subject: x\r\n\r\nhi", **envelope)))  # type: ignore[arg-type]
            else:
                send = asyncio.create_task(router.submit(b"Subject: x\r\n\r\nhi", **envelope))  # type: ignore[arg-type]
            while not (first.sessions and first.sessions[0].commands.count("RCPT") >= 2):
                await asyncio.sleep(0.005)  # the record has no event for a refused RCPT
            await first.stop()  # the first relay goes down while slow@ backs off
            result = await send
    assert result.relay == "backup"
    assert [m.rcpt_tos for m in backup.messages] == [["slow@example.net"]]
    assert result.refused["bad@example.net"][0] == 550


async def test_close_without_drain_never_connects_again_to_a_silent_relay() -> None:
    opened: list[asyncio.StreamWriter] = []
    stall = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        opened.append(writer)  # accepts TCP, never greets
        await stall.wait()

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    pool = SMTPPool(hostname="127.0.0.1", port=port, size=8, timeout=1)
    sends = [asyncio.create_task(pool.submit(make_message(i))) for i in range(8)]
    while not opened:
        await asyncio.sleep(0.01)
    async with asyncio.timeout(3):  # at most one connect timeout, not one per slot
        await pool.close(drain=False)
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
    assert all(isinstance(o, PoolClosedError) for o in outcomes), outcomes
    assert len(opened) == 1
    stall.set()
    for writer in opened:
        writer.close()
    listener.close()
    await listener.wait_closed()


async def test_421_with_enhanced_status_4_7_halves_the_rate(server: FaultyServer, mode: str) -> None:
    """docs/library.md promise 12: a 421 that ends the session is a throttling reply by its 4.7.x status
    too, not only by its words (Gmail: "421 4.7.0 Try again later, closing connection")."""
    server.faults.mail_code = "421 4.7.0 Try again later, closing connection."
    server.faults.mail_code_times = 1
    async with SMTPPool(**options(server, mode, size=1, rate_limit=100.0)) as pool:
        result = await pool.submit(make_message(1))
        assert result.attempts == 2  # transient: retried on a new session
        assert pool.rate.current == pytest.approx(50.0, rel=0.2)


async def test_close_without_drain_does_not_send_a_message_waiting_for_the_rate(server: FaultyServer,
                                                                               mode: str) -> None:
    """docs/library.md promise 8 and the first signal of `dispatcher run`: a message a worker holds while it
    waits for the rate limiter is not on the wire; close(drain=False) fails it at once."""
    pool = SMTPPool(**options(server, mode, size=1, rate_limit=0.5))  # one message every 2 s
    async with pool:
        assert (await pool.submit(make_message(1))).attempts == 1
        second = asyncio.ensure_future(pool.submit(make_message(2)))
        async with asyncio.timeout(5):
            # Queued, then taken by the worker, which now waits for the limiter.
            while pool._unfinished < 1 or pool.queue_depth():
                await asyncio.sleep(0.01)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await pool.close(drain=False)
        assert loop.time() - started < 1.0, "close(drain=False) waited for the rate limiter"
        (outcome,) = await asyncio.gather(second, return_exceptions=True)
    assert isinstance(outcome, PoolClosedError), outcome
    assert [m.message_id for m in server.messages] == ["<m1@test.local>"], "sent after close(drain=False)"


async def test_a_username_for_a_relay_without_auth_is_a_permanent_session_failure(server: FaultyServer,
                                                                                  mode: str) -> None:
    """Not "unreachable" for relay_down_timeout: the relay answers, it just takes no login."""
    async with SMTPPool(**options(server, mode, username="me", password="secret", start_tls=False,
                                  relay_down_timeout=30.0)) as pool:
        async with asyncio.timeout(5):
            with pytest.raises(RelayError) as raised:
                await pool.submit(make_message(1))
    assert raised.value.transient is False
    assert "does not offer AUTH" in str(raised.value) and "secret" not in str(raised.value)
    assert len(server.sessions) == 1  # one try, not one per message or per probe


async def test_a_message_prepared_ahead_is_sent_as_it_is(server: FaultyServer, mode: str) -> None:
    """``pool.prepare`` does submit's checks and wire conversion ahead (the compose
    process of `dispatcher run` does it off the event loop); ``submit(envelope)``."""
    from pool import Envelope, prepare

    raw = b"From: a@example.org\nSubject: prepared\nMessage-ID: <p1@test.local>\n\n.a dot first\nbye\n"
    envelope = prepare(raw, sender="a@example.org", recipients=["b@example.net", "c@example.net", "b@example.net"])
    assert isinstance(envelope, Envelope) and envelope.recipients == ("b@example.net", "c@example.net")
    with pytest.raises(ValueError, match="recipients"):
        prepare(raw, sender="a@example.org", recipients=["evil@example.net>\r\nRCPT TO:<x@y"])
    async with SMTPPool(**options(server, mode)) as pool:
        result = await pool.submit(envelope)
        with pytest.raises(ValueError, match="carries its own sender"):
            await pool.submit(envelope, recipients=["b@example.net"])
    assert result.message_id == "<p1@test.local>" and sorted(result.accepted) == ["b@example.net", "c@example.net"]
    (message,) = server.messages
    assert message.content.replace(b"\r\n", b"\n").endswith(b"\n.a dot first\nbye\n")  # un-stuffed by the server


async def test_a_message_moved_to_another_relay_counts_its_time_on_the_first() -> None:
    """As documented: SendResult.elapsed is submit to result, through every relay tried."""
    from pool import SMTPRouter

    async with FaultyServer() as backup:
        from _support import free_port

        router = SMTPRouter({"down": SMTPPool("127.0.0.1", free_port(), size=1, relay_down_timeout=0.5,
                                              backoff_base=0.05, backoff_max=0.1, timeout=2),
                             "backup": SMTPPool(**options(backup, "pipelined"))},
                            weights={"down": 100, "backup": 1})
        async with asyncio.timeout(10), router:
            loop = asyncio.get_running_loop()
            started = loop.time()
            result = await router.submit(make_message(1))  # "down" first: weight 100 to 1
            waited = loop.time() - started
    assert result.relay == "backup"
    assert result.elapsed >= 0.5 and result.elapsed == pytest.approx(waited, abs=0.05), (result.elapsed, waited)
