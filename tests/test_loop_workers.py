"""The suppression list with Redis workers (``suppression.redis: true``: one hash shared
by every machine): two ``dispatcher worker``s leave listed recipients out, suppress a
5.1.1 refusal for the other, and the next campaign skips exactly those."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from redisserver import RedisServer
from smtpserver import FaultyServer
from test_redis import WorkerProcess, cli, redis_server, results, workers, write_config, write_jobs

__all__ = ["redis_server", "workers"]  # fixtures

pytestmark = pytest.mark.timeout(150)


def campaign(name: str) -> list[dict[str, object]]:
    return [{"id": f"{name}-{i}", "from": "news@example.org", "to": to, "subject": "news", "text": "Hi.\n"}
            for i, to in enumerate([["ok1@example.net"], ["Listed@example.net"], ["refused@example.net"],
                                    ["ok2@example.net", "listed@example.net"], ["ok3@example.net"]])]


async def run_campaign(name: str, url: str, config: Path, tmp_path: Path, started: list[WorkerProcess]) -> str:
    """Enqueue the campaign, run two workers until the stream is empty; returns what enqueue said."""
    jobs = write_jobs(tmp_path / f"{name}.jsonl", campaign(name))
    code, _, err = await cli("enqueue", str(jobs), "--redis", url, "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    pair = [await WorkerProcess.start(started, "--redis", url, "--config", str(config), "--name", f"{name}-w{k}",
                                      "--until-empty", cwd=tmp_path) for k in (1, 2)]
    assert [await worker.wait() for worker in pair] == [0, 0]
    return err


async def test_two_workers_share_one_suppression_list_in_redis(redis_server: RedisServer, tmp_path: Path,
                                                               workers: list[WorkerProcess]) -> None:
    url = redis_server.url
    async with FaultyServer() as server:
        server.faults.rcpt["refused@example.net"] = "550 5.1.1 <refused@example.net>: User unknown"
        config = write_config(tmp_path / "c.yaml", server, redis={"url": url})
        config.write_text(config.read_text() + f"suppression:\n  redis: true\n  path: {tmp_path / 'unused.sqlite'}\n")
        code, _, err = await cli("suppress", "add", "listed@example.net", "--reason", "complaint", "--config",
                                 str(config), cwd=tmp_path)
        assert code == 0, err

        said = await run_campaign("c1", url, config, tmp_path, workers)
        assert "4 jobs added" in said and "1 suppressed (every recipient listed)" in said, said  # c1-1
        rows = {r["id"]: r for r in await results(url, tmp_path)}
        assert rows["c1-1"]["status"] == "suppressed" and rows["c1-1"]["suppressed"] == ["Listed@example.net"]
        assert rows["c1-2"]["status"] == "failed"
        assert rows["c1-3"]["status"] == "sent" and rows["c1-3"]["suppressed"] == ["listed@example.net"]
        assert sorted(r for m in server.messages for r in m.rcpt_tos) == [
            "ok1@example.net", "ok2@example.net", "ok3@example.net"]
        code, out, _ = await cli("suppress", "list", "--config", str(config), cwd=tmp_path)
        listed = {r["address"]: (r["reason"], r["job_id"], r["source"]) for r in map(json.loads, out.splitlines())}
        assert listed == {"listed@example.net": ("complaint", None, "suppress add"),
                          "refused@example.net": ("hard_bounce", "c1-2", "worker")}
        assert not (tmp_path / "unused.sqlite").exists()  # the Redis hash, not the file

        before = len(server.messages)
        said = await run_campaign("c2", url, config, tmp_path, workers)
        assert "3 jobs added" in said and "2 suppressed" in said, said  # c2-1 and c2-2: never on the stream
        rows = {r["id"]: r for r in await results(url, tmp_path)}
        assert [rows[f"c2-{i}"]["status"] for i in range(5)] == ["sent", "suppressed", "suppressed", "sent", "sent"]
        assert sorted(r for m in server.messages[before:] for r in m.rcpt_tos) == [
            "ok1@example.net", "ok2@example.net", "ok3@example.net"]
        code, out, err = await cli("status", "--redis", url, "--json", cwd=tmp_path)
        assert json.loads(out)["done"]["suppressed"] == 3, out


async def test_a_worker_counts_the_recipients_it_leaves_out_on_its_metrics(
        redis_server: RedisServer, tmp_path: Path, workers: list[WorkerProcess]) -> None:
    import asyncio
    import signal
    import urllib.request

    from _support import free_port

    url, port = redis_server.url, free_port()
    async with FaultyServer() as server:
        config = write_config(tmp_path / "c.yaml", server, redis={"url": url})
        config.write_text(config.read_text() + f"suppression:\n  path: {tmp_path / 'list.sqlite'}\n")
        code, _, err = await cli("suppress", "add", "gone@example.net", "--config", str(config), cwd=tmp_path)
        assert code == 0, err
        jobs = write_jobs(tmp_path / "j.jsonl", [{"id": "j1", "from": "news@example.org", "subject": "s",
                                                  "text": "Hi.\n", "to": ["gone@example.net", "here@example.net"]}])
        code, _, err = await cli("enqueue", str(jobs), "--redis", url, "--config", str(config), cwd=tmp_path)
        assert code == 0, err
        worker = await WorkerProcess.start(workers, "--redis", url, "--config", str(config), "--metrics-port",
                                           str(port), cwd=tmp_path)
        await server.wait_for(lambda: len(server.messages) >= 1, timeout=30)
        assert server.messages[0].rcpt_tos == ["here@example.net"]
        async with asyncio.timeout(10):
            while True:
                text = await asyncio.to_thread(
                    lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode())
                if 'dispatcher_suppressed_total{reason="manual"} 1.0' in text:
                    break
                await asyncio.sleep(0.05)
        worker.proc.send_signal(signal.SIGTERM)
        assert await worker.wait() == 130
