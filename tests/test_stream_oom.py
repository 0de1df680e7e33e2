"""Redis at maxmemory while a worker records, for longer than claim_after, with a second
worker live: the first keeps its sent entries, so the second never sends them again."""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import redis.asyncio as aioredis
from smtpserver import FaultyServer
from test_redis import WorkerProcess, delivered, enqueue, job, redis_server, results, workers, write_config, write_jobs  # noqa: F401

N = 10  # jobs: each test's worker a sends them all, then cannot record them

async def _two_workers_a_sending_into_an_outage(
    url: str, tmp_path: Path, workers: list[WorkerProcess], first: FaultyServer, second: FaultyServer,  # noqa: F811
    *, a_until_empty: bool,
) -> tuple[WorkerProcess, WorkerProcess, aioredis.Redis]:
    """Worker a holds the jobs (its relay gated), worker b is live, then Redis reaches
    maxmemory and a's relay accepts everything: a has sent all and cannot record it."""
    first.gate = asyncio.Event()
    until_empty = ["--until-empty"] if a_until_empty else []
    a = await WorkerProcess.start(workers, "--redis", url, "--config",
                                  str(write_config(tmp_path / "a.yaml", first, redis={"claim_after": 1.0})),
                                  "--name", "a", *until_empty, cwd=tmp_path)
    await first.wait_for(lambda: first.data_started >= 2, timeout=20)
    b = await WorkerProcess.start(workers, "--redis", url, "--config",
                                  str(write_config(tmp_path / "b.yaml", second, redis={"claim_after": 1.0})),
                                  "--name", "b", "--until-empty", cwd=tmp_path)
    await b.wait_event("worker.start")
    client = aioredis.Redis.from_url(url)
    await client.config_set("maxmemory", 1)
    first.gate.set()
    await a.wait_event("redis.unavailable")
    await first.wait_for(lambda: len(first.messages) == N, timeout=20)
    return a, b, client


async def test_an_outage_of_memory_longer_than_claim_after_sends_nothing_twice(
    redis_server, tmp_path: Path, workers: list[WorkerProcess]  # noqa: F811
) -> None:
    async with FaultyServer() as first, FaultyServer() as second:
        url = redis_server.url
        await enqueue(url, write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(N)]))
        a, b, client = await _two_workers_a_sending_into_an_outage(url, tmp_path, workers, first, second,
                                                                   a_until_empty=True)
        try:
            await asyncio.sleep(4)  # the outage itself (a few claim_after), not a synchronisation
            await client.config_set("maxmemory", 0)
        finally:
            await client.aclose()
        await a.wait(timeout=30)
        await b.wait(timeout=30)
    one, two = delivered(first), delivered(second)
    both = set(one) & set(two)
    assert not both, f"sent twice (once by each worker): {sorted(both)}"


async def test_a_worker_stopped_while_redis_is_out_of_memory_keeps_what_it_sent_until_recorded(
    redis_server, tmp_path: Path, workers: list[WorkerProcess]  # noqa: F811
) -> None:
    """SIGTERM while the settles wait out maxmemory: the stopping worker keeps touching
    the entries it sent until their settles are committed, so the live worker never
    claims them after claim_after and sends them a second time."""
    async with FaultyServer() as first, FaultyServer() as second:
        url = redis_server.url
        await enqueue(url, write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(N)]))
        a, b, client = await _two_workers_a_sending_into_an_outage(url, tmp_path, workers, first, second,
                                                                   a_until_empty=False)
        try:
            a.proc.send_signal(signal.SIGTERM)
            await a.wait_event("worker.stopping")
            await asyncio.sleep(4)  # the outage itself (a few claim_after), not a synchronisation
            await client.config_set("maxmemory", 0)
        finally:
            await client.aclose()
        assert await a.wait(timeout=30) == 130
        assert await b.wait(timeout=30) == 0
    one, two = delivered(first), delivered(second)
    both = set(one) & set(two)
    assert not both, f"sent twice (once by each worker): {sorted(both)}"
