"""``dispatcher run`` in a hostile environment (issue 17): closed standard descriptors,
FIFOs, an unread stderr, a full TMPDIR, memory bounded by bytes, the operator's view.
The command runs in a subprocess against real servers (tests/smtpserver.py); every
test is bounded in time."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from smtpserver import FaultyServer
from test_dispatcher import job, results, write_config, write_jobs
from test_run_faults import finish, spawn

pytestmark = pytest.mark.timeout(60)


def _closing(*fds: int) -> Callable[[], None]:
    def close() -> None:
        for fd in fds:
            os.close(fd)

    return close


# -- 1, 3. closed standard descriptors -------------------------------------------------


@pytest.mark.parametrize("closed", [(2,), (1,), (0, 1, 2)], ids=["stderr", "stdout", "all"])
async def test_closed_standard_descriptors_change_nothing_but_the_lost_log_lines(
    server: FaultyServer, tmp_path: Path, closed: tuple[int, ...]
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(30)] + ["not json"])
    config = write_config(tmp_path / "c.yaml", server)
    proc = await spawn("run", str(jobs), "--config", str(config), cwd=tmp_path, preexec_fn=_closing(*closed))
    code, _ = await finish(proc)
    assert code == 1  # the invalid line; not 1 in silence with nothing sent, not SIGABRT (134)
    statuses = sorted(r["status"] for r in results(tmp_path / "jobs.results.jsonl"))
    assert statuses == ["invalid"] + ["sent"] * 30
    assert len(server.messages) == 30


async def test_jobs_from_a_closed_standard_input_are_none(server: FaultyServer, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", server)
    proc = await spawn("run", "-", "--results", "r.jsonl", "--config", str(config), cwd=tmp_path,
                       preexec_fn=_closing(0))
    code, err = await finish(proc)
    assert code == 0, err  # /dev/null: no jobs; never one of the event loop's own descriptors
    assert (tmp_path / "r.jsonl").read_bytes() == b""


# -- 9. an unread stderr ---------------------------------------------------------------


async def test_a_stderr_pipe_nobody_reads_neither_stalls_the_run_nor_its_signals(
    server: FaultyServer, tmp_path: Path
) -> None:
    # 3,000 invalid lines log ~600 KB, ten times what a pipe holds.
    jobs = write_jobs(tmp_path / "jobs.jsonl", [f"not json {i}" for i in range(3000)] + [job(1)])
    config = write_config(tmp_path / "c.yaml", server)
    read_end, write_end = os.pipe()
    try:
        proc = await spawn("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path,
                           stderr=write_end)
    finally:
        os.close(write_end)
    try:
        code, _ = await finish(proc)
    finally:
        os.close(read_end)
    assert code == 1
    assert len(results(tmp_path / "jobs.results.jsonl")) == 3001
    assert len(server.messages) == 1


# -- 2. a jobs FIFO opened before its writer -----------------------------------------------


async def _line_containing(stream: asyncio.StreamReader, text: str) -> None:
    async with asyncio.timeout(20):
        while text not in (await stream.readline()).decode():
            pass


async def test_a_jobs_fifo_is_read_once_its_writer_opens_it(server: FaultyServer, tmp_path: Path) -> None:
    fifo = tmp_path / "jobs.jsonl"
    os.mkfifo(fifo)
    config = write_config(tmp_path / "c.yaml", server)
    proc = await spawn("run", str(fifo), "--config", str(config), "--no-progress", cwd=tmp_path)
    assert proc.stderr is not None
    await _line_containing(proc.stderr, "run.start")  # the run is up, and no writer has come yet
    with pytest.raises(TimeoutError):  # it waits for the writer (it used to end at once, exit 0)
        await asyncio.wait_for(asyncio.shield(proc.wait()), 1.0)
    writer = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # succeeds: a reader holds the FIFO
    os.set_blocking(writer, True)
    with os.fdopen(writer, "w") as out:
        for i in range(3):
            out.write(json.dumps(job(i)) + "\n")
    code, err = await finish(proc)
    assert code == 0, err
    assert sorted(r["status"] for r in results(tmp_path / "jobs.results.jsonl")) == ["sent"] * 3


# -- 5, 8. the results file is a regular file, not the jobs file ----------------------------


async def test_results_file_that_is_the_jobs_file_is_refused(server: FaultyServer, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(5)])
    before = jobs.read_bytes()
    (tmp_path / "same.jsonl").symlink_to(jobs)
    config = write_config(tmp_path / "c.yaml", server)
    for name in ("jobs.jsonl", "same.jsonl"):
        proc = await spawn("run", str(jobs), "--config", str(config), "--results", name, cwd=tmp_path)
        code, err = await finish(proc)
        assert code == 2
        assert err.strip() == f"dispatcher: {name}: the results file is the jobs file; name another one with --results"
    assert jobs.read_bytes() == before
    assert server.messages == []


async def test_a_results_file_that_is_a_fifo_or_a_pipe_is_refused_at_once(
    server: FaultyServer, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(5)])
    config = write_config(tmp_path / "c.yaml", server)
    os.mkfifo(tmp_path / "results.fifo")
    proc = await spawn("run", str(jobs), "--config", str(config), "--results", "results.fifo", cwd=tmp_path)
    code, err = await finish(proc, timeout=15)
    assert (code, err.strip()) == (2, "dispatcher: results.fifo: the results file must be a regular file, "
                                      "not a pipe or FIFO")
    # `--results /dev/stdout | cat`
    proc = await spawn("run", str(jobs), "--config", str(config), "--results", "/dev/stdout", cwd=tmp_path,
                       stdout=asyncio.subprocess.PIPE)
    code, err = await finish(proc, timeout=15)
    assert code == 2 and "/dev/stdout: the results file must be a regular file" in err
    assert server.messages == []
