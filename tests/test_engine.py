"""The engine's promises (dispatcher/engine/engine.py), in process against a real SMTP
server (tests/smtpserver.py): a list of jobs stands for the jobs file or the stream,
and a ledger that keeps every settle stands for the results file or the stream's
SETTLE script."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path
from typing import Any

import pytest
from smtpserver import FaultyServer

from dispatcher.compose.jobs import Line
from dispatcher.compose.stage import Composer
from dispatcher.config import Settings
from dispatcher.engine.engine import Engine
from dispatcher.engine.outcome import Outcome
from dispatcher.engine.ports import Delivery, Halt, Verdict
from dispatcher.engine.tally import Tally
from dispatcher.exit import ExitCode
from dispatcher.loop.suppression import Admission, SuppressionStore
from pool import SMTPPool

pytestmark = pytest.mark.timeout(30)


class ListSource:
    def __init__(self, deliveries: list[Delivery], batch: int = 8) -> None:
        self.deliveries = deliveries
        self.batch = batch
        self.closed = False

    async def batches(self) -> AsyncGenerator[Sequence[Delivery], None]:
        for start in range(0, len(self.deliveries), self.batch):
            yield self.deliveries[start:start + self.batch]
            await asyncio.sleep(0)

    def close(self) -> None:
        self.closed = True


class KeepingLedger:
    """Admits every job; keeps each settle by line. ``halt_on``: raise Halt when
    settling that status; ``bug_on``: a line whose retry recipients raise (a bug)."""

    def __init__(self, *, halt_on: str | None = None, bug_on: int | None = None,
                 withdraw: set[int] | None = None) -> None:
        self.settled: dict[int, list[str]] = {}
        self.halt_on = halt_on
        self.bug_on = bug_on
        self.withdraw = withdraw or set()
        self.confirmed: list[int] = []

    def admit(self, delivery: Delivery) -> Verdict:
        if delivery.line == self.bug_on:
            return Verdict.RETRY
        return Verdict.INVALID if delivery.error is not None else Verdict.SEND

    def to_retry(self, delivery: Delivery, recipients: list[str]) -> list[str]:
        raise RuntimeError("boom")

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        self.settled.setdefault(delivery.line, []).append(outcome.status)
        if outcome.status == self.halt_on:
            raise Halt(ExitCode.USAGE, "cannot record")

    async def confirm(self, delivery: Delivery) -> bool:
        self.confirmed.append(delivery.line)
        self.settled.setdefault(delivery.line, []).append("withdrawn")
        return False


def composer(tmp_path: Path) -> Composer:
    return Composer(Settings(), base_dir=tmp_path, attachments_root=tmp_path, batch="engine-tests")


def deliveries(compose: Composer, count: int, *, lease: Any = None) -> list[Delivery]:
    out = []
    for n in range(1, count + 1):
        raw = json.dumps({"id": f"job-{n}", "from": "sender@example.org", "to": [f"rcpt{n}@example.net"],
                          "subject": f"message {n}", "text": "Hello.\n", "headers": {"X-Job-Id": f"job-{n}"}})
        data = raw.encode()
        job = compose.parse(Line(n, data, len(data)))
        out.append(Delivery(n, job.id, len(data), job=job, lease=lease))
    return out


def engine(source: ListSource, ledger: KeepingLedger, compose: Composer, pool: SMTPPool, **kwargs: Any) -> Engine:
    said: list[str] = []
    store = SuppressionStore(compose.attachments_root / "suppressed.sqlite")
    built = Engine(source, ledger, compose, pool, admission=Admission(store), tally=Tally(),
                   say=said.append, max_bytes=1 << 20, **kwargs)
    built.said = said  # type: ignore[attr-defined]
    return built


def pool_for(server: FaultyServer, **kwargs: Any) -> SMTPPool:
    options: dict[str, Any] = {"hostname": server.host, "port": server.port, "size": 2, "queue_size": 4,
                               "timeout": 5.0, "backoff_base": 0.001, "backoff_max": 0.01}
    options.update(kwargs)
    return SMTPPool(**options)


def sent_ids(server: FaultyServer) -> list[str]:
    return [m.header("X-Job-Id") or "" for m in server.messages]


def engine_tasks() -> list[asyncio.Task[Any]]:
    return [t for t in asyncio.all_tasks() if "Engine." in getattr(t.get_coro(), "__qualname__", "")]


async def test_every_job_is_settled_once_and_each_message_sent_once(server: FaultyServer, tmp_path: Path) -> None:
    compose = composer(tmp_path)
    ledger = KeepingLedger()
    run = engine(ListSource(deliveries(compose, 60)), ledger, compose, pool_for(server))
    async with asyncio.timeout(20):
        tally = await run.run()
    assert ledger.settled == {n: ["sent"] for n in range(1, 61)}
    assert sorted(sent_ids(server)) == sorted(f"job-{n}" for n in range(1, 61))
    assert tally.counts["sent"] == 60 and tally.jobs_read == 60 and run.stop_code is None
    assert engine_tasks() == []


async def test_a_stop_in_the_middle_settles_what_was_not_sent_as_unsent(server: FaultyServer, tmp_path: Path) -> None:
    server.gate = asyncio.Event()
    compose = composer(tmp_path)
    ledger = KeepingLedger()
    run = engine(ListSource(deliveries(compose, 200), batch=50), ledger, compose, pool_for(server))
    running = asyncio.create_task(run.run())
    await server.wait_for(lambda: server.data_started >= 2, timeout=10)
    run.halt(ExitCode.SIGNAL, "stopping")
    server.gate.set()
    async with asyncio.timeout(20):
        await running
    assert run.stop_code == ExitCode.SIGNAL
    # Each job handed out is settled once at most: sent when on the wire, else unsent;
    # the jobs of the batch in hand when the stop came are settled unsent too.
    assert all(len(statuses) == 1 for statuses in ledger.settled.values()), ledger.settled
    sent = {n for n, statuses in ledger.settled.items() if statuses == ["sent"]}
    assert {f"job-{n}" for n in sent} == set(sent_ids(server)) and len(sent_ids(server)) == len(sent)
    assert Counter(s for (s,) in ledger.settled.values()) == {"sent": len(sent),
                                                               "unsent": len(ledger.settled) - len(sent)}
    assert len(ledger.settled) >= 50 and len(sent) < 200
    assert engine_tasks() == []


async def test_a_ledger_that_cannot_record_stops_the_engine_and_nothing_hangs(
    server: FaultyServer, tmp_path: Path
) -> None:
    compose = composer(tmp_path)
    ledger = KeepingLedger(halt_on="sent")
    run = engine(ListSource(deliveries(compose, 100)), ledger, compose, pool_for(server))
    async with asyncio.timeout(20):
        await run.run()
    assert run.stop_code == ExitCode.USAGE and set(run.said) == {"cannot record"}  # type: ignore[attr-defined]
    assert all(len(statuses) == 1 for statuses in ledger.settled.values())
    assert len(server.messages) < 100
    assert engine_tasks() == []


async def test_a_bug_in_a_sender_stops_the_engine_and_hands_its_job_back(server: FaultyServer, tmp_path: Path) -> None:
    compose = composer(tmp_path)
    ledger = KeepingLedger(bug_on=3)
    run = engine(ListSource(deliveries(compose, 40)), ledger, compose, pool_for(server))
    async with asyncio.timeout(20):
        await run.run()
    assert run.stop_code == ExitCode.USAGE
    assert run.said == ["internal error on line 3: RuntimeError: boom"]  # type: ignore[attr-defined]
    assert ledger.settled[3] == ["unsent"]
    assert "job-3" not in sent_ids(server)
    assert all(len(statuses) == 1 for statuses in ledger.settled.values())


async def test_cancelling_the_engine_is_never_swallowed_and_leaves_no_task(
    server: FaultyServer, tmp_path: Path
) -> None:
    server.gate = asyncio.Event()
    compose = composer(tmp_path)
    pool = pool_for(server)
    run = engine(ListSource(deliveries(compose, 50)), KeepingLedger(), compose, pool)
    running = asyncio.create_task(run.run())
    await server.wait_for(lambda: server.data_started >= 1, timeout=10)
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await running
    assert engine_tasks() == []
    server.gate.set()
    pool.terminate()
    await pool.close(drain=False)


async def test_an_engine_cancelled_as_it_starts_leaves_no_task(server: FaultyServer, tmp_path: Path) -> None:
    compose = composer(tmp_path)
    pool = pool_for(server)
    # progress=None: a progress task that logs every 10 s (stderr is no terminal here).
    run = engine(ListSource(deliveries(compose, 5)), KeepingLedger(), compose, pool, progress=None)
    running = asyncio.create_task(run.run())
    await asyncio.sleep(0)  # run() has started its progress and suppression-watch tasks, and yields once
    running.cancel()
    with pytest.raises(asyncio.CancelledError):
        async with asyncio.timeout(10):
            await running
    leftover = engine_tasks() + [t for t in asyncio.all_tasks() if "Admission.watch" in repr(t.get_coro())]
    for task in leftover:
        task.cancel()
    assert leftover == []
    await pool.close(drain=False)


async def test_a_delivery_whose_lease_lapsed_is_confirmed_before_it_goes_on_the_wire(
    server: FaultyServer, tmp_path: Path
) -> None:
    compose = composer(tmp_path)
    ledger = KeepingLedger()
    run = engine(ListSource(deliveries(compose, 5, lease=lambda: False)), ledger, compose, pool_for(server),
                 connect_first=False)
    async with asyncio.timeout(20):
        await run.run()
    assert sorted(ledger.confirmed) == [1, 2, 3, 4, 5]
    assert ledger.settled == {n: ["withdrawn"] for n in range(1, 6)}  # the ledger settled them: nothing more
    assert server.messages == []
