"""docs/redis.md end to end: a real ``redis-server`` (AOF on), a real SMTP server
(``FaultyServer``), and ``dispatcher enqueue|worker|status|results`` as subprocesses."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from _support import free_port
from redisserver import RedisServer, require_redis
from smtpserver import FaultyServer

from dispatcher.compose.mime import derived_message_id
from dispatcher.stream import keys as stream_keys
from dispatcher.stream import report as redis_report
from dispatcher.stream import store as redis_store
from dispatcher.stream.enqueue import Enqueuer

pytestmark = pytest.mark.timeout(60)

DISPATCHER = [sys.executable, "-m", "dispatcher.cli"]
ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture
async def redis_server(tmp_path: Path) -> AsyncIterator[RedisServer]:
    require_redis()
    async with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
async def workers() -> AsyncIterator[list[WorkerProcess]]:
    started: list[WorkerProcess] = []
    yield started
    for worker in started:
        await worker.kill()


async def cli(*args: str, cwd: Path, timeout: float = 30, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *DISPATCHER, *args, cwd=cwd, env={**ENV, **(env or {})}, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class WorkerProcess:
    """``dispatcher worker`` in a subprocess; its JSON log lines are read as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.events: list[dict[str, Any]] = []
        self.text: list[str] = []
        self._changed = asyncio.Event()
        assert proc.stderr is not None
        self._reader = asyncio.create_task(self._read(proc.stderr))

    @classmethod
    async def start(cls, started: list[WorkerProcess], *args: str, cwd: Path) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            *DISPATCHER, "worker", *args, cwd=cwd, env=ENV, stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )
        worker = cls(proc)
        started.append(worker)
        return worker

    async def _read(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.text.append(line.decode(errors="replace"))
            self._changed.set()
            self._changed = asyncio.Event()

    async def wait_event(self, name: str, timeout: float = 20) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                for event in self.events:
                    if event.get("event") == name:
                        return event
                if self._reader.done():
                    raise AssertionError(f"worker exited before {name}: {self.events[-5:]} {self.text}")
                await self._changed.wait()

    async def wait(self, timeout: float = 30) -> int:
        async with asyncio.timeout(timeout):
            code = await self.proc.wait()
            await self._reader
        return code

    def summary(self) -> dict[str, Any]:
        return next(e for e in self.events if e.get("event") == "worker.summary")

    async def kill(self) -> None:
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await self._reader


def job(n: int | str, **extra: Any) -> dict[str, Any]:
    record: dict[str, Any] = {"id": f"job-{n}", "from": "sender@example.org", "to": [f"rcpt{n}@example.net"],
                              "subject": f"message {n}", "text": "Hello.\n", "headers": {"X-Job-Id": f"job-{n}"}}
    record.update(extra)
    return record


def write_jobs(path: Path, jobs: Sequence[dict[str, Any] | str]) -> Path:
    with path.open("w") as f:
        for item in jobs:
            f.write((item if isinstance(item, str) else json.dumps(item)) + "\n")
    return path


def write_config(path: Path, server: FaultyServer, *, redis: dict[str, Any] | None = None,
                 max_attempts: int = 3, **pool: Any) -> Path:
    pool = {"size": 2, **pool}
    lines = [f"smtp:\n  hostname: 127.0.0.1\n  port: {server.port}\n  timeout: 5\n",
             "pool:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in pool.items()),
             f"retry:\n  max_attempts: {max_attempts}\n  backoff_base: 0.001\n  backoff_max: 0.01\n",
             "logging:\n  format: json\n"]
    if redis:
        lines.append("redis:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in redis.items()))
    path.write_text("".join(lines))
    return path


def delivered(server: FaultyServer) -> Counter[str | None]:
    return Counter(m.header("X-Job-Id") for m in server.messages)


# The commands themselves run as subprocesses in the enqueue and two-worker tests; the
# other tests enqueue and read status and results in this process (the same functions),
# to keep the file's run time down.


async def status(url: str, cwd: Path | None = None) -> dict[str, Any]:
    if cwd is not None:
        code, out, err = await cli("status", "--redis", url, "--json", cwd=cwd)
        assert code == 0, err
        return dict(json.loads(out))
    client = redis_store.client(url)
    try:
        return (await redis_report.status(client, stream_keys.Keys(stream_keys.DEFAULT_STREAM), "dispatcher")).as_dict()
    finally:
        await client.aclose()


async def results(url: str, cwd: Path | None = None) -> list[dict[str, Any]]:
    if cwd is not None:
        code, out, err = await cli("results", "--redis", url, cwd=cwd)
        assert code == 0, err
        return [json.loads(line) for line in out.splitlines()]
    client = redis_store.client(url)
    buffer = io.BytesIO()
    try:
        await redis_report.write_results(client, stream_keys.Keys(stream_keys.DEFAULT_STREAM), buffer)
    finally:
        await client.aclose()
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


async def enqueue(url: str, jobs: Path) -> None:
    client = redis_store.client(url)
    try:
        with jobs.open("rb") as stream:
            counts = await Enqueuer(client, stream_keys.Keys(stream_keys.DEFAULT_STREAM), "dispatcher").enqueue(stream)
    finally:
        await client.aclose()
    assert counts.rejected == 0


def assert_one_row_per_id(rows: list[dict[str, Any]], ids: set[str]) -> None:
    by_id = Counter(row["id"] for row in rows)
    assert set(by_id) == ids
    assert max(by_id.values()) == 1


# -- enqueue ------------------------------------------------------------------------------


async def test_enqueue_twice_adds_nothing_twice_and_invalid_lines_become_results(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        *(job(n) for n in range(1, 21)),
        "this is not JSON",                                  # line 21: no id at all
        job(3, subject="same id again"),                     # line 22: duplicate id
        job("bad", to=["not an address"]),                   # line 23: bad field
        job("crlf", subject="Hi\r\nBcc: victim@example.net"),  # line 24: header injection
    ])
    url = redis_server.url
    code, _, err = await cli("enqueue", str(jobs), "--redis", url, cwd=tmp_path)
    assert code == 1, err  # some lines were invalid, as with `run`
    assert "20 jobs added to dispatcher:jobs, 4 invalid" in err

    code, _, err = await cli("enqueue", str(jobs), "--redis", url, cwd=tmp_path)
    assert code == 1, err  # the file still holds invalid lines, as a re-run of `run` says
    assert "0 jobs added to dispatcher:jobs, 4 invalid (in dispatcher:jobs:results), 24 already enqueued" in err

    client = aioredis.Redis.from_url(url)
    try:
        assert await client.xlen("dispatcher:jobs") == 20
        first = (await client.xrange("dispatcher:jobs", count=1))[0][1]
        assert json.loads(first[b"job"])["id"] == "job-1" and first[b"line"] == b"1"
    finally:
        await client.aclose()

    rows = await results(url, tmp_path)
    assert [(r["line"], r["id"], r["status"]) for r in rows] == [
        (21, None, "invalid"), (22, None, "invalid"), (23, "job-bad", "invalid"), (24, "job-crlf", "invalid")]
    errors = [r["error"] for r in rows]
    assert errors[0].startswith("line 21: not valid JSON")
    assert errors[1] == "line 22: id: duplicate of line 3's id 'job-3'"
    assert errors[2].startswith("line 23: to.0: ")
    assert errors[3].startswith("line 24: subject: ") and "CR or LF" in errors[3]

    code, text, err = await cli("status", "--redis", url, cwd=tmp_path)
    assert code == 0, err
    assert text.splitlines() == [
        "stream: dispatcher:jobs (group dispatcher)",
        "enqueued: 20",
        "invalid at enqueue: 4",
        "done: 4 (sent 0, failed 0, invalid 4)",
        "waiting: 20",
        "pending: 0",
        "dead: 0",
        "rate: 0.0/s over the last minute (0 finished)",
    ]


async def test_redis_unavailable_at_start_is_one_line_naming_the_url_without_its_password(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1)])
    userinfo, query = f"redis://:hunter2secret@127.0.0.1:{port}/0", f"redis://127.0.0.1:{port}/0?password=hunter2secret"
    for args, url in ((("worker",), userinfo), (("enqueue", str(jobs)), query), (("status",), userinfo),
                      (("results",), query)):
        code, _, err = await cli(*args, "--redis", url, cwd=tmp_path)
        assert code == 2, (args, err)
        assert len(err.strip().splitlines()) == 1, err
        assert f"127.0.0.1:{port}" in err and "hunter2secret" not in err and "Traceback" not in err
    code, _, err = await cli("worker", cwd=tmp_path)
    assert code == 2 and "--redis URL is required" in err


@pytest.mark.parametrize("url", [
    "redis://:hunter2secret@127.0.0.1:6379/0", "redis://hunter2secret@127.0.0.1:6379/0",
    "redis://user:hunter2secret@127.0.0.1/0", "redis:/:hunter2secret@127.0.0.1", "rediss//:hunter2secret@h:1/0",
    "redis://127.0.0.1/0?password=hunter2secret&db=1", "redis://u:p@hunter2secret@127.0.0.1:1/0",
])
def test_redact_never_shows_the_password_whatever_the_urls_shape(url: str) -> None:
    shown = redis_store.redact(url)
    assert "hunter2secret" not in shown and "***" in shown


async def test_the_redis_url_may_come_from_the_environment_so_that_ps_never_shows_its_password(
    tmp_path: Path,
) -> None:
    require_redis()
    async with RedisServer(tmp_path / "redis", password="hunter2secret") as server:
        code, out, err = await cli("status", "--json", cwd=tmp_path, env={"DISPATCHER_REDIS_URL": server.url})
    assert code == 0, err
    assert json.loads(out)["enqueued"] == 0


# -- workers ------------------------------------------------------------------------------


async def test_two_workers_share_the_stream_and_each_job_is_delivered_once(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    n = 300
    async with FaultyServer() as server:
        server.faults.delay = 0.005
        config = write_config(tmp_path / "c.yaml", server)
        url = redis_server.url
        pair = [await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--name", name,
                                          cwd=tmp_path) for name in ("w1", "w2")]
        for worker in pair:
            await worker.wait_event("worker.start")
        jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)])
        code, _, err = await cli("enqueue", str(jobs), "--redis", url, cwd=tmp_path)
        assert code == 0, err
        await server.wait_for(lambda: len(server.messages) >= n, timeout=40)
        for worker in pair:
            worker.proc.send_signal(signal.SIGTERM)
        assert [await worker.wait() for worker in pair] == [130, 130]

    counts = delivered(server)
    assert set(counts) == {f"job-{i}" for i in range(n)}
    assert max(counts.values()) == 1
    sent = [worker.summary()["sent"] for worker in pair]
    assert sum(sent) == n and min(sent) > 0, sent
    report = await status(url, tmp_path)
    assert report["done"] == {"sent": n, "failed": 0, "invalid": 0}
    assert (report["waiting"], report["pending"], report["dead"]) == (0, 0, 0)
    assert report["consumers"] == []  # both left the group: nothing of theirs was pending
    assert 0 < report["finished_last_minute"] <= n
    rows = await results(url, tmp_path)
    assert_one_row_per_id(rows, set(counts))
    assert {r["status"] for r in rows} == {"sent"} and all(r["code"] == 250 for r in rows)
    # The Message-ID comes from the id and the stream: the same whichever worker sends it.
    received = {m.header("X-Job-Id"): m.message_id for m in server.messages}
    assert all(r["message_id"] == received[r["id"]] == derived_message_id(r["id"], "dispatcher:jobs", "example.org")
               for r in rows)


async def test_a_killed_workers_pending_jobs_are_claimed_and_only_its_wire_is_sent_twice(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    n = 30
    async with FaultyServer() as server:
        server.gate = asyncio.Event()  # every end of DATA waits: the first worker is stuck on the wire
        config = write_config(tmp_path / "c.yaml", server, redis={"claim_after": 1.0})
        url = redis_server.url
        jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)])
        await enqueue(url, jobs)
        doomed = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--name", "doomed",
                                           cwd=tmp_path)
        await server.wait_for(lambda: server.data_started >= 2, timeout=20)  # both its sessions mid-DATA
        held = await status(url)
        assert held["consumers"][0]["name"] == "doomed" and held["consumers"][0]["pending"] == n
        await doomed.kill()  # SIGKILL
        server.gate.set()
        survivor = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--name", "heir",
                                             "--until-empty", cwd=tmp_path)
        assert await survivor.wait() == 0

    counts = delivered(server)
    assert set(counts) == {f"job-{i}" for i in range(n)}
    twice = sum(c - 1 for c in counts.values())
    assert twice <= 2, counts  # at most the two messages the killed worker had on the wire
    assert survivor.summary()["sent"] == n
    report = await status(url)
    assert report["done"]["sent"] == n and report["pending"] == 0 and report["waiting"] == 0
    assert [c["pending"] for c in report["consumers"]] == [0]  # "doomed", its entries taken
    assert_one_row_per_id(await results(url), set(counts))


async def test_three_workers_one_killed_mid_run_every_job_delivered(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    n = 450
    async with FaultyServer() as server:
        server.faults.delay = 0.015  # ~130 messages/s per worker: the kill lands mid-run
        config = write_config(tmp_path / "c.yaml", server, redis={"claim_after": 1.0})
        url = redis_server.url
        jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)])
        await enqueue(url, jobs)
        trio = [await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--name", f"w{i}",
                                          "--until-empty", cwd=tmp_path) for i in range(3)]
        await server.wait_for(lambda: len(server.messages) >= n // 4, timeout=30)
        await trio[0].kill()
        codes = [await worker.wait(timeout=40) for worker in trio[1:]]
        assert codes == [0, 0]

    counts = delivered(server)
    assert set(counts) == {f"job-{i}" for i in range(n)}
    twice = sum(c - 1 for c in counts.values())
    assert twice <= 4, twice  # the killed worker's wire: 2 sessions, pipelined
    report = await status(url)
    assert report["done"]["sent"] == n and (report["pending"], report["waiting"], report["dead"]) == (0, 0, 0)
    assert_one_row_per_id(await results(url), set(counts))


async def test_sigterm_finishes_the_wire_and_releases_the_rest_at_once(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    n = 20
    async with FaultyServer() as server:
        server.gate = asyncio.Event()
        # claim_after is long: only a release lets the next worker take the entries now.
        config = write_config(tmp_path / "c.yaml", server, redis={"claim_after": 120})
        url = redis_server.url
        jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)])
        await enqueue(url, jobs)
        first = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), cwd=tmp_path)
        await server.wait_for(lambda: server.data_started >= 2, timeout=20)
        first.proc.send_signal(signal.SIGTERM)
        await first.wait_event("worker.stopping")
        server.gate.set()
        assert await first.wait() == 130
        on_wire = first.summary()["sent"]
        assert 2 <= on_wire < n and first.summary()["released"] == n - on_wire
        # A job whose id is already done is acknowledged without sending (an entry added by hand).
        done_id = (await results(url))[0]["id"]
        client = aioredis.Redis.from_url(url)
        try:
            await client.xadd("dispatcher:jobs", {"id": done_id, "line": "1", "job": json.dumps(job(done_id[4:]))})
        finally:
            await client.aclose()
        second = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--until-empty",
                                           cwd=tmp_path)
        assert await second.wait(timeout=20) == 0
        assert second.summary()["sent"] == n - on_wire and second.summary()["skipped"] == 1

    counts = delivered(server)
    assert set(counts) == {f"job-{i}" for i in range(n)} and max(counts.values()) == 1


async def test_a_second_signal_stops_at_once_and_nothing_is_recorded_for_what_was_on_the_wire(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with FaultyServer() as server:
        server.gate = asyncio.Event()  # never opened: the wire never finishes
        config = write_config(tmp_path / "c.yaml", server)
        url = redis_server.url
        jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(10)])
        await enqueue(url, jobs)
        worker = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--name", "w",
                                           cwd=tmp_path)
        await server.wait_for(lambda: server.data_started >= 2, timeout=20)
        worker.proc.send_signal(signal.SIGINT)
        await worker.wait_event("worker.stopping")
        worker.proc.send_signal(signal.SIGINT)
        assert await worker.wait(timeout=10) == 130
    assert not any("Traceback" in line for line in worker.text), worker.text
    report = await status(url)
    # Nothing recorded; every entry is still in the stream for the next worker.
    assert report["done"]["sent"] == 0 and report["pending"] + report["waiting"] == 10


async def test_a_relay_refusing_the_login_stops_the_worker_with_exit_2_and_releases_its_jobs(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with FaultyServer(credentials=("user", "right")) as server:
        config = write_config(tmp_path / "c.yaml", server)
        config.write_text(config.read_text().replace(
            "  timeout: 5\n", "  timeout: 5\n  start_tls: false\n  username: user\n  password: hunter2-wrong\n"))
        url = redis_server.url
        jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(10)])
        await enqueue(url, jobs)
        worker = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), cwd=tmp_path)
        assert await worker.wait() == 2
    assert server.messages == []
    assert any("refused the login: 535" in line for line in worker.text), worker.text
    assert "hunter2-wrong" not in "".join(worker.text) + json.dumps(worker.events)
    assert worker.summary()["released"] == 10
    report = await status(url)
    # Handed back to the stream at once, for any worker.
    assert report["done"]["sent"] == 0 and report["dead"] == 0 and (report["waiting"], report["pending"]) == (10, 0)


async def test_poison_job_goes_to_the_dead_stream_and_attachments_stay_under_the_root(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    root = tmp_path / "files"
    root.mkdir()
    (root / "ok.txt").write_text("attached\n")
    (tmp_path / "secret.txt").write_text("not for mailing\n")
    async with FaultyServer() as server:
        server.faults.rcpt["poison@example.net"] = "450 4.2.1 Mailbox busy, try later"  # always
        config = write_config(tmp_path / "c.yaml", server, max_attempts=1,
                              redis={"claim_after": 0.3, "max_deliveries": 2})
        url = redis_server.url
        jobs = write_jobs(tmp_path / "jobs.jsonl", [
            job(1), job("poison", to=["poison@example.net"]), job(3),
            job("att", attachments=[{"filename": "ok.txt", "path": "ok.txt"}]),
            job("escape", attachments=[{"filename": "s.txt", "path": "../secret.txt"}]),
            job("abs", attachments=[{"filename": "s.txt", "path": str(tmp_path / "secret.txt")}]),
        ])
        await enqueue(url, jobs)
        worker = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--until-empty",
                                           "--attachments-root", str(root), cwd=tmp_path)
        assert await worker.wait() == 0

    assert sorted(c for c in delivered(server)) == ["job-1", "job-3", "job-att"]
    attached = next(m for m in server.messages if m.header("X-Job-Id") == "job-att")
    assert b"ok.txt" in attached.content and b"not for mailing" not in b"".join(m.content for m in server.messages)
    assert worker.summary()["deferred"] == 2  # delivered max_deliveries times, then dead
    report = await status(url)
    assert report["dead"] == 1 and report["done"] == {"sent": 3, "failed": 0, "invalid": 2}
    client = aioredis.Redis.from_url(url)
    try:
        [(_, dead)] = await client.xrange("dispatcher:jobs:dead")
    finally:
        await client.aclose()
    assert dead[b"id"] == b"job-poison" and dead[b"deliveries"] == b"2" and dead[b"line"] == b"2"
    assert b"450" in dead[b"reason"] and json.loads(dead[b"job"])["id"] == "job-poison"
    rows = {r["id"]: r for r in await results(url)}
    assert "job-poison" not in rows
    assert rows["job-escape"]["status"] == rows["job-abs"]["status"] == "invalid"
    assert rows["job-escape"]["error"].startswith("line 5: attachments.0.path: ")
    assert "outside the attachments root" in rows["job-abs"]["error"]


async def test_rate_limit_holds_across_three_workers(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    rate, n = 50.0, 150
    arrivals: list[float] = []
    async with FaultyServer() as server:
        config = write_config(tmp_path / "c.yaml", server, rate_limit=rate, size=4)
        url = redis_server.url
        trio = [await WorkerProcess.start(workers, "--redis", url, "--config", str(config), cwd=tmp_path)
                for _ in range(3)]
        for worker in trio:
            await worker.wait_event("worker.start")
        jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)])
        await enqueue(url, jobs)

        def arrived() -> bool:
            while len(arrivals) < len(server.messages):
                arrivals.append(time.monotonic())
            return len(arrivals) >= n

        await server.wait_for(arrived, timeout=30)
        # `status` reports the rate of a run seconds old as that rate, not as n / 60 (read
        # now: the seconds the workers take to exit would count as idle ones).
        async with asyncio.timeout(10):
            while (report := await status(url))["finished_last_minute"] < n:
                pass
        for worker in trio:
            worker.proc.send_signal(signal.SIGTERM)
        assert [await worker.wait() for worker in trio] == [130, 130, 130]

    assert min(worker.summary()["sent"] for worker in trio) > 0  # all sent: the limit is shared
    overall = (n - 1) / (arrivals[-1] - arrivals[0])
    assert rate * 0.85 <= overall <= rate * 1.1, overall
    # Any two seconds (arrival times carry this loop's scheduling jitter): per worker it would be 3 x.
    busiest = max(sum(1 for t in arrivals if start <= t < start + 2.0) for start in arrivals)
    assert busiest <= 2 * rate * 1.1 + 2, busiest
    assert report["finished_last_minute"] == n
    assert rate * 0.6 <= report["rate_per_s"] <= rate * 1.2, report


async def test_redis_restart_mid_run_loses_nothing(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    n = 400
    async with FaultyServer() as server:
        server.faults.delay = 0.01
        # Down longer than claim_after: every held entry looks idle when Redis is back.
        config = write_config(tmp_path / "c.yaml", server, redis={"claim_after": 1.0})
        url = redis_server.url
        jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)])
        await enqueue(url, jobs)
        pair = [await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--until-empty",
                                          cwd=tmp_path) for _ in range(2)]
        await server.wait_for(lambda: len(server.messages) >= n // 4, timeout=30)
        await redis_server.restart(kill=True, down_for=1.5)  # SIGKILL: only the AOF survives
        assert [await worker.wait(timeout=40) for worker in pair] == [0, 0]

    assert redis_server.starts == 2
    assert any(e.get("event") == "redis.unavailable" for worker in pair for e in worker.events)
    counts = delivered(server)
    assert set(counts) == {f"job-{i}" for i in range(n)}
    assert max(counts.values()) == 1  # nothing acknowledged was lost, nothing was sent again
    report = await status(url)
    assert report["done"]["sent"] == n and (report["pending"], report["waiting"]) == (0, 0)
    assert_one_row_per_id(await results(url), set(counts))


async def test_workers_send_through_relays_by_weight_and_serve_metrics(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """relays: (two sinks, weights 3:1) in two workers; one serves /metrics with the
    pool's series labelled by relay, its jobs and the entries it holds."""
    import urllib.request

    n = 400
    port = free_port()
    async with FaultyServer() as heavy, FaultyServer() as light:
        config = tmp_path / "relays.yaml"
        config.write_text(
            "relays:\n"
            f"  - {{name: heavy, hostname: 127.0.0.1, port: {heavy.port}, weight: 3, timeout: 5}}\n"
            f"  - {{name: light, hostname: 127.0.0.1, port: {light.port}, weight: 1, timeout: 5}}\n"
            "pool:\n  size: 2\nlogging:\n  format: json\n")
        url = redis_server.url
        await enqueue(url, write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)]))
        pair = [await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--name", "w1",
                                          "--metrics-port", str(port), cwd=tmp_path),
                await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--name", "w2",
                                          "--until-empty", cwd=tmp_path)]
        await heavy.wait_for(lambda: len(heavy.messages) + len(light.messages) >= n, timeout=30)
        assert await pair[1].wait() == 0
        async with asyncio.timeout(10):
            while (await status(url))["done"]["sent"] < n:
                pass
        start = await pair[0].wait_event("worker.start")
        assert start["metrics"].endswith(f":{port}/metrics")
        scrape = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
        pair[0].proc.send_signal(signal.SIGTERM)
        assert await pair[0].wait() == 130

    counts = delivered(heavy) + delivered(light)
    assert set(counts) == {f"job-{i}" for i in range(n)} and max(counts.values()) == 1
    share = len(heavy.messages) / n
    assert 0.65 <= share <= 0.85, share  # 3:1
    sent_here = pair[0].summary()["sent"]
    assert f'dispatcher_jobs_total{{status="sent"}} {float(sent_here)}' in scrape, scrape
    assert 'smtp_pool_messages_total{outcome="sent",relay="heavy"}' in scrape
    assert 'smtp_pool_messages_total{outcome="sent",relay="light"}' in scrape
    assert "dispatcher_worker_entries_held 0.0" in scrape


async def test_a_worker_composes_as_run_does_templates_unsubscribe_and_dkim(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """The worker runs the compose stage of ``run``: a templated job is rendered, gets
    the unsubscribe headers, and every message is DKIM-signed (verified by dkimpy)."""
    import dkim  # type: ignore[import-untyped]
    from test_campaign import DOMAIN, SELECTOR, dns_for, private_pem

    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "welcome.subject").write_text("Welcome, {{ name }}")
    (templates / "welcome.text").write_text("Hello {{ name }}, your id is {{ id }}.\n")
    pem = private_pem("ed25519-sha256")
    (tmp_path / "dkim.pem").write_bytes(pem)
    async with FaultyServer() as server:
        config = write_config(tmp_path / "c.yaml", server)
        with config.open("a") as f:
            f.write(f"templates:\n  dir: {templates}\n"
                    "jobs:\n  default_from: news@example.org\n"
                    "unsubscribe:\n  url: https://example.org/u/{{ id }}\n"
                    f"dkim:\n  domain: {DOMAIN}\n  selector: {SELECTOR}\n  private_key: {tmp_path / 'dkim.pem'}\n"
                    "  algorithm: ed25519-sha256\n")
        lines = [{"id": "t1", "template": "welcome", "to": ["ann@example.net"], "data": {"name": "Ann"},
                  "headers": {"X-Job-Id": "t1"}},
                 job(2),
                 {"id": "t3", "template": "welcome", "to": ["bob@example.net"], "data": {}}]  # data.name missing
        await enqueue(redis_server.url, write_jobs(tmp_path / "jobs.jsonl", lines))
        worker = await WorkerProcess.start(workers, "--redis", redis_server.url, "--config", str(config),
                                           "--until-empty", cwd=tmp_path)
        assert await worker.wait() == 0, worker.text

    assert sorted(delivered(server)) == ["job-2", "t1"]
    rendered = next(m for m in server.messages if m.header("X-Job-Id") == "t1")
    assert rendered.header("Subject") == "Welcome, Ann"
    assert b"Hello Ann, your id is t1." in rendered.content
    assert rendered.header("List-Unsubscribe") == "<https://example.org/u/t1>"
    assert rendered.header("List-Unsubscribe-Post") == "List-Unsubscribe=One-Click"
    for message in server.messages:
        assert dkim.verify(message.content, dnsfunc=dns_for(pem)), message.rcpt_tos
    rows = {row["id"]: row for row in await results(redis_server.url)}
    assert rows["t3"]["status"] == "invalid" and "data.name" in rows["t3"]["error"], rows["t3"]


async def test_enqueue_renders_templates_when_their_directory_is_here(redis_server: RedisServer,
                                                                      tmp_path: Path) -> None:
    templates = tmp_path / "templates"
    templates.mkdir()
    (templates / "hi.subject").write_text("Hi {{ name }}")
    (templates / "hi.text").write_text("Hello {{ name }}\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"templates:\n  dir: {templates}\njobs:\n  default_from: news@example.org\n")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        {"id": "a", "template": "hi", "to": ["a@example.net"], "data": {"name": "A"}},
        {"id": "b", "template": "hi", "to": ["b@example.net"]},  # data.name undefined
        {"id": "c", "template": "nope", "to": ["c@example.net"]},
    ])
    code, _, err = await cli("enqueue", str(jobs), "--redis", redis_server.url, "--config", str(config), cwd=tmp_path)
    assert code == 1, err
    assert "1 jobs added" in err and "2 invalid" in err, err
    rows = {row["id"]: row for row in await results(redis_server.url)}
    assert "data.name" in rows["b"]["error"] and rows["c"]["error"].startswith("line 3: template:"), rows


# -- the defects of a paused, stopped or crowded worker ----------------------------------


async def test_a_paused_worker_never_sends_what_another_worker_claimed_and_recorded_meanwhile(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """SIGSTOP past claim_after, then SIGCONT: the other worker has claimed and recorded
    every job; the resumed one sends none of them (only what was already on its wire)."""
    n = 30
    async with FaultyServer() as first_relay, FaultyServer() as second_relay:
        first_relay.gate = asyncio.Event()  # the first worker's two sessions stop at the end of DATA
        url = redis_server.url
        await enqueue(url, write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)]))
        paused = await WorkerProcess.start(
            workers, "--redis", url, "--config",
            str(write_config(tmp_path / "a.yaml", first_relay, redis={"claim_after": 1.0})),
            "--name", "paused", "--until-empty", cwd=tmp_path)
        await first_relay.wait_for(lambda: first_relay.data_started >= 2, timeout=20)
        paused.proc.send_signal(signal.SIGSTOP)
        try:
            other = await WorkerProcess.start(
                workers, "--redis", url, "--config",
                str(write_config(tmp_path / "b.yaml", second_relay, redis={"claim_after": 1.0})),
                "--name", "other", "--until-empty", cwd=tmp_path)
            assert await other.wait(timeout=30) == 0
        finally:
            paused.proc.send_signal(signal.SIGCONT)
        first_relay.gate.set()
        assert await paused.wait(timeout=30) == 0

    assert set(delivered(second_relay)) == {f"job-{i}" for i in range(n)}
    # What was on the paused worker's wire before the pause: one message per session and
    # the envelope pipelined behind it, at most.
    assert len(first_relay.messages) <= 4, sorted(delivered(first_relay))
    assert paused.summary()["lost"] >= n - 4
    assert_one_row_per_id(await results(url), {f"job-{i}" for i in range(n)})


async def test_jobs_handed_back_unsent_never_end_up_dead(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """Three workers in a row stop on a refused login and hand every job back: handing
    back is not a delivery, so none reaches :dead (max_deliveries 2); the next worker
    with the right password sends them all."""
    n = 10
    async with FaultyServer(credentials=("user", "right")) as server:
        url = redis_server.url
        await enqueue(url, write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)]))
        for password in ("wrong1", "wrong2", "wrong3", "right"):
            config = write_config(tmp_path / "c.yaml", server, redis={"claim_after": 0.3, "max_deliveries": 2})
            config.write_text(config.read_text().replace(
                "  timeout: 5\n", f"  timeout: 5\n  start_tls: false\n  username: user\n  password: {password}\n"))
            worker = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--until-empty",
                                               cwd=tmp_path)
            assert await worker.wait() == (0 if password == "right" else 2), worker.text
            assert (await status(url))["dead"] == 0
    assert set(delivered(server)) == {f"job-{i}" for i in range(n)}
    assert (await status(url))["done"]["sent"] == n


async def test_a_job_refused_4xx_every_time_goes_back_at_once_and_reaches_dead_without_waiting_for_a_claim(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """claim_after is 120 s: a transient give-up goes back to the stream at once
    (counting one delivery), so three deliveries take well under a claim."""
    async with FaultyServer() as server:
        server.faults.rcpt["busy@example.net"] = "450 4.2.1 Mailbox busy, try later"  # always
        config = write_config(tmp_path / "c.yaml", server, max_attempts=1,
                              redis={"claim_after": 120, "max_deliveries": 3})
        url = redis_server.url
        await enqueue(url, write_jobs(tmp_path / "jobs.jsonl", [job(1), job("busy", to=["busy@example.net"])]))
        worker = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--until-empty",
                                           cwd=tmp_path)
        assert await worker.wait(timeout=20) == 0
    assert worker.summary()["deferred"] == 3
    report = await status(url)
    assert report["dead"] == 1 and report["done"]["sent"] == 1
    client = aioredis.Redis.from_url(url)
    try:
        [(_, dead)] = await client.xrange("dispatcher:jobs:dead")
    finally:
        await client.aclose()
    assert dead[b"id"] == b"job-busy" and dead[b"deliveries"] == b"3" and b"450" in dead[b"reason"]


async def test_redis_out_of_memory_while_recording_is_waited_out_and_nothing_is_sent_twice(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    n = 10
    async with FaultyServer() as server:
        server.gate = asyncio.Event()
        config = write_config(tmp_path / "c.yaml", server)
        url = redis_server.url
        await enqueue(url, write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(n)]))
        worker = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--until-empty",
                                           cwd=tmp_path)
        await server.wait_for(lambda: server.data_started >= 2, timeout=20)
        client = aioredis.Redis.from_url(url)
        try:
            await client.config_set("maxmemory", 1)  # every write that may grow memory is refused (OOM)
            server.gate.set()
            event = await worker.wait_event("redis.unavailable")
            assert "maxmemory" in event["error"]
            code, _, err = await cli("enqueue", str(tmp_path / "jobs.jsonl"), "--redis", url, cwd=tmp_path)
            assert code == 2 and len(err.strip().splitlines()) == 1 and "out of memory" in err, err
            await client.config_set("maxmemory", 0)
        finally:
            await client.aclose()
        assert await worker.wait(timeout=30) == 0
    assert not any("Traceback" in line for line in worker.text), worker.text
    counts = delivered(server)
    assert set(counts) == {f"job-{i}" for i in range(n)} and max(counts.values()) == 1
    assert_one_row_per_id(await results(url), set(counts))


async def test_a_deleted_stream_stops_the_worker_with_one_line_and_what_it_sent_is_recorded(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with FaultyServer() as server:
        server.gate = asyncio.Event()
        config = write_config(tmp_path / "c.yaml", server)
        url = redis_server.url
        await enqueue(url, write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(10)]))
        worker = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), cwd=tmp_path)
        await server.wait_for(lambda: server.data_started >= 2, timeout=20)
        client = aioredis.Redis.from_url(url)
        try:
            await client.flushall()
        finally:
            await client.aclose()
        server.gate.set()
        assert await worker.wait(timeout=30) == 2
    assert not any("Traceback" in line for line in worker.text), worker.text
    said = [line for line in worker.text if line.startswith("dispatcher worker:")]
    assert len(said) == 1 and "dispatcher:jobs" in said[0] and "gone" in said[0], worker.text
    sent = set(delivered(server))
    assert sent and {row["id"] for row in await results(url)} == sent  # recorded, so never sent again


async def test_wrong_type_keys_and_a_user_without_scripting_are_one_line_exit_2(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    url = redis_server.url
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1)])
    client = aioredis.Redis.from_url(url)
    try:
        await client.set("dispatcher:jobs:done", "not a hash")
        for args in (("enqueue", str(jobs)), ("status",), ("results",), ("worker", "--until-empty")):
            code, _, err = await cli(*args, "--redis", url, cwd=tmp_path)
            assert code == 2, (args, err)
            assert len(err.strip().splitlines()) == 1 and "dispatcher:jobs:done" in err, (args, err)
        await client.delete("dispatcher:jobs:done")
        await client.execute_command("ACL", "SETUSER", "noscript", "on", ">pw", "~*", "&*", "+@all", "-@scripting")
    finally:
        await client.aclose()
    limited = url.replace("redis://", "redis://noscript:pw@")
    for args in (("enqueue", str(jobs)), ("worker", "--until-empty")):
        code, _, err = await cli(*args, "--redis", limited, cwd=tmp_path)
        assert code == 2, (args, err)
        said = [line for line in err.splitlines() if line.startswith("dispatcher ")]  # a worker also logs
        assert "permission" in said[-1] and "evalsha" in said[-1] and "Traceback" not in err, (args, err)
        assert ":pw@" not in err


async def test_a_second_live_worker_with_the_same_name_exits_2_naming_the_first(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    async with FaultyServer() as server:
        config = write_config(tmp_path / "c.yaml", server, redis={"claim_after": 1.0})
        url = redis_server.url
        first = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--name", "w",
                                          cwd=tmp_path)
        await first.wait_event("worker.start")
        second = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--name", "w",
                                           cwd=tmp_path)
        assert await second.wait() == 2
        assert any("a worker named 'w' is running already" in line and f"pid {first.proc.pid}" in line
                   for line in second.text), second.text
        await enqueue(url, write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(20)]))
        await server.wait_for(lambda: len(server.messages) >= 20, timeout=20)
        first.proc.send_signal(signal.SIGTERM)
        assert await first.wait() == 130
        # Gone, its name is free at once.
        again = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--name", "w",
                                          "--until-empty", cwd=tmp_path)
        assert await again.wait() == 0
    assert max(delivered(server).values()) == 1


async def test_requeue_puts_dead_and_invalid_jobs_back_and_their_new_result_replaces_the_old(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    root, wrong_root = tmp_path / "files", tmp_path / "empty"
    root.mkdir()
    wrong_root.mkdir()
    (root / "late.txt").write_text("here\n")
    async with FaultyServer() as server:
        server.faults.rcpt["busy@example.net"] = "450 4.2.1 Mailbox busy, try later"
        config = write_config(tmp_path / "c.yaml", server, max_attempts=1, redis={"max_deliveries": 1})
        url = redis_server.url
        jobs = write_jobs(tmp_path / "jobs.jsonl", [
            job(1), job("busy", to=["busy@example.net"]), job("busy2", to=["busy@example.net"]),
            job("att", attachments=[{"filename": "late.txt", "path": "files/late.txt"}]),  # not under the worker's root
            job("bad", to=["not an address"]),  # invalid at enqueue
        ])
        code, _, err = await cli("enqueue", str(jobs), "--redis", url, "--attachments-root", str(root), cwd=tmp_path)
        assert code == 1, err
        worker_args = ("--redis", url, "--config", str(config), "--until-empty", "--attachments-root")
        worker = await WorkerProcess.start(workers, *worker_args, str(wrong_root), cwd=tmp_path)
        assert await worker.wait() == 0
        report = await status(url)
        assert report["dead"] == 2 and report["done"] == {"sent": 1, "failed": 0, "invalid": 2}

        del server.faults.rcpt["busy@example.net"]  # fixed: the mailbox, the root, the address
        write_jobs(tmp_path / "jobs.jsonl", [
            job(1), job("busy", to=["busy@example.net"]), job("busy2", to=["busy@example.net"]),
            job("att", attachments=[{"filename": "late.txt", "path": "files/late.txt"}]), job("bad"),
        ])
        (tmp_path / "ids.txt").write_text("job-busy\n")
        code, _, err = await cli("requeue", "--redis", url, "--ids", str(tmp_path / "ids.txt"), cwd=tmp_path)
        assert code == 0 and "1 jobs back on dispatcher:jobs (1 dead, 0 invalid)" in err, err
        code, _, err = await cli("requeue", "--redis", url, "--dead", "--invalid", cwd=tmp_path)
        assert code == 0 and "2 jobs back on dispatcher:jobs (1 dead, 1 invalid); 1 ids invalid at enqueue" in err, err
        code, _, err = await cli("enqueue", str(jobs), "--redis", url, "--attachments-root", str(root), cwd=tmp_path)
        assert code == 0 and "1 jobs added" in err, err  # job-bad, fixed
        worker = await WorkerProcess.start(workers, *worker_args, str(root), cwd=tmp_path)
        assert await worker.wait() == 0

    counts = delivered(server)
    assert set(counts) == {"job-1", "job-busy", "job-busy2", "job-att", "job-bad"} and max(counts.values()) == 1
    rows = await results(url)
    assert_one_row_per_id(rows, set(counts))
    assert {row["status"] for row in rows} == {"sent"}
    report = await status(url)
    assert report["dead"] == 0 and report["done"] == {"sent": 5, "failed": 0, "invalid": 0}


async def test_enqueue_memory_is_bounded_by_bytes_not_only_lines(redis_server: RedisServer, tmp_path: Path) -> None:
    """48 lines of 1 MiB: the batch sent to Redis is flushed by its bytes, so the peak of
    Python memory stays far below the file's size (it held every line before)."""
    import tracemalloc

    body = "x" * (1 << 20)
    jobs = write_jobs(tmp_path / "big.jsonl", [job(i, text=body) for i in range(48)])
    client = redis_store.client(redis_server.url)
    tracemalloc.start()
    try:
        with jobs.open("rb") as stream:
            counts = await Enqueuer(client, stream_keys.Keys(stream_keys.DEFAULT_STREAM), "dispatcher").enqueue(stream)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
        await client.aclose()
    assert counts.added == 48
    assert peak < 24 << 20, f"{peak / (1 << 20):.1f} MiB"


async def test_an_attachment_enqueued_from_another_directory_is_delivered_by_a_worker_under_its_root(
    redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]
) -> None:
    """enqueue resolves a path against the jobs file's directory, checks it is inside
    jobs.attachments_root and stores it relative to that root; the worker, started
    elsewhere, reads it relative to its own root."""
    campaign, elsewhere = tmp_path / "campaign", tmp_path / "elsewhere"
    (campaign / "files").mkdir(parents=True)
    elsewhere.mkdir()
    (campaign / "files" / "report.txt").write_text("the report\n")
    (campaign / "secret.txt").write_text("not for mailing\n")
    async with FaultyServer() as server:
        config = write_config(tmp_path / "c.yaml", server)
        with config.open("a") as f:
            f.write(f"jobs:\n  attachments_root: {campaign / 'files'}\n")
        url = redis_server.url
        jobs = write_jobs(campaign / "jobs.jsonl", [
            job("att", attachments=[{"filename": "report.txt", "path": "files/report.txt"}]),
            job("escape", attachments=[{"filename": "s.txt", "path": "secret.txt"}]),
            job("missing", attachments=[{"filename": "m.txt", "path": "files/missing.txt"}]),
        ])
        code, _, err = await cli("enqueue", str(jobs), "--redis", url, "--config", str(config), cwd=elsewhere)
        assert code == 1 and "1 jobs added" in err and "2 invalid" in err, err
        worker = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--until-empty",
                                           cwd=elsewhere)
        assert await worker.wait() == 0, worker.text
    [message] = server.messages
    assert message.header("X-Job-Id") == "job-att" and base64.b64encode(b"the report\n") in message.content
    rows = {row["id"]: row for row in await results(url)}
    assert rows["job-att"]["status"] == "sent"
    assert rows["job-escape"]["status"] == rows["job-missing"]["status"] == "invalid"
    assert "attachments.0.path" in rows["job-escape"]["error"] and "outside" in rows["job-escape"]["error"]
