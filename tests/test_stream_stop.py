"""A worker stopping while Redis is handing it entries: a real redis-server behind a TCP
proxy that holds back one reply on its way (a slow network, made long), so that the
stop comes while the read is in flight."""
from __future__ import annotations

import asyncio
import signal
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from smtpserver import FaultyServer
from test_redis import WorkerProcess, enqueue, job, redis_server, workers, write_config, write_jobs  # noqa: F401

from dispatcher.stream.keys import DEFAULT_GROUP, DEFAULT_STREAM


class HoldingProxy:
    """Forwards TCP to Redis. Once ``armed``, the first reply that carries a job is
    held back (``held`` is set) until ``released`` is."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.armed = False
        self.held = asyncio.Event()
        self.released = asyncio.Event()
        self.url = ""
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def __aenter__(self) -> HoldingProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"redis://127.0.0.1:{self._server.sockets[0].getsockname()[1]}/0"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.released.set()
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()  # both ends of every connection: each pipe reads its end and stops
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=10)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.port)
            self._writers.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer, hold=False), self._pipe(up_reader, writer, hold=True))
        except OSError:
            pass
        finally:
            writer.close()
            self._tasks.discard(task)

    async def _pipe(self, source: asyncio.StreamReader, target: asyncio.StreamWriter, *, hold: bool) -> None:
        try:
            while data := await source.read(65536):
                if hold and self.armed and b"job-" in data:
                    self.armed = False
                    self.held.set()
                    await self.released.wait()
                target.write(data)
                await target.drain()
        except OSError:
            pass
        finally:
            target.close()


async def test_a_read_in_flight_when_the_worker_stops_is_handed_back_not_left_pending(
    redis_server, tmp_path: Path, workers: list[WorkerProcess]  # noqa: F811
) -> None:
    n = 5
    async with FaultyServer() as server, HoldingProxy(redis_server.port) as proxy:
        # claim_after is long: an entry left pending on the stopped worker waits that long.
        config = write_config(tmp_path / "c.yaml", server, redis={"claim_after": 120})
        worker = await WorkerProcess.start(workers, "--redis", proxy.url, "--config", str(config), "--name", "w",
                                           cwd=tmp_path)
        await worker.wait_event("worker.start")
        proxy.armed = True
        await enqueue(redis_server.url, write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)]))
        async with asyncio.timeout(20):
            await proxy.held.wait()  # Redis has given the entries to w: its reply is on the way
        worker.proc.send_signal(signal.SIGTERM)
        await worker.wait_event("worker.stopping")
        await asyncio.sleep(0.5)  # the reply comes after the stop has begun (not a synchronisation)
        proxy.released.set()
        assert await worker.wait(timeout=20) == 130
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        pending = await client.xpending(DEFAULT_STREAM, DEFAULT_GROUP)
        length = await client.xlen(DEFAULT_STREAM)
    finally:
        await client.aclose()
    assert pending["pending"] == 0, f"left pending on the stopped worker: {pending}"
    assert length == n and server.messages == []
