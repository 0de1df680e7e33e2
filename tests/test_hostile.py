"""``dispatcher run`` in a hostile environment (issue 17): closed standard descriptors,
FIFOs, an unread stderr, a full TMPDIR, memory bounded by bytes, the operator's view.
The command runs in a subprocess against real servers (tests/smtpserver.py); every
test is bounded in time."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import make_message
from prometheus_client import CollectorRegistry
from smtpserver import FaultyServer
from test_dispatcher import DISPATCHER, job, results, write_config, write_jobs
from test_operator import Pty, Terminal
from test_run_faults import ENV, finish, spawn

import dispatcher.batch.journal as journal_module
import dispatcher.compose.process as compose_module
from dispatcher.batch.runner import Run, RunOptions
from dispatcher.config import load_settings
from dispatcher.exit import ExitCode
from dispatcher.observe.logs import DroppingStream
from pool import SMTPPool

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


# -- 4. a full TMPDIR ----------------------------------------------------------------


async def test_a_tmpdir_that_cannot_be_written_is_named_not_the_jobs_file(
    server: FaultyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(journal_module._Spill, "FLUSH_AT", 256)  # the ids reach the file after a few jobs
    monkeypatch.setenv("TMPDIR", str(tmp_path / "gone"))  # honoured, not replaced by /tmp
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(200)])
    settings = load_settings(write_config(tmp_path / "c.yaml", server))
    run = Run(RunOptions(jobs=str(jobs), results=tmp_path / "r.jsonl", progress=False, compose_process=False),
              settings)
    async with asyncio.timeout(20):
        code = await run.execute()
    assert code == ExitCode.USAGE
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dispatcher:")]
    assert said == [f"dispatcher: cannot write the job ids' temporary file in {tmp_path / 'gone'}: No such file "
                    "or directory (it needs about 21 bytes per job id; TMPDIR names the directory); run stopped"]


# -- 6. a missing templates.dir ------------------------------------------------------


async def test_a_missing_templates_dir_is_said_before_anything_is_sent_or_recorded(
    server: FaultyServer, tmp_path: Path
) -> None:
    templated = {"id": "t", "template": "welcome", "to": ["a@example.net"], "from": "a@example.org"}
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(20)] + [templated]
                      + [job(i) for i in range(20, 40)])
    config = write_config(tmp_path / "c.yaml", server)
    with config.open("a") as f:
        f.write("templates:\n  dir: nowhere\n")
    for compose_process in ("--compose-process", "--no-compose-process"):
        proc = await spawn("run", str(jobs), "--config", str(config), compose_process, cwd=tmp_path)
        code, err = await finish(proc)
        assert code == 2
        assert err.strip() == (f"dispatcher: templates.dir: 'nowhere' does not exist (a relative directory is "
                               f"taken from {str(tmp_path)!r})")
        assert not (tmp_path / "jobs.results.jsonl").exists()
    assert server.messages == []


# -- 7. exit 2 leaves nothing behind; blank lines are counted ------------------------------


async def test_an_exit_2_run_leaves_no_results_file_of_its_own(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", ["not json"] + [job(i) for i in range(5)])
    async with FaultyServer(credentials=("user", "right")) as server:
        config = tmp_path / "c.yaml"
        config.write_text(f"smtp:\n  hostname: 127.0.0.1\n  port: {server.port}\n  start_tls: false\n"
                          "  username: user\n  password: wrong\n")
        proc = await spawn("run", str(jobs), "--config", str(config), cwd=tmp_path)
        code, err = await finish(proc)
        assert code == 2, err
        assert "refused the login: 535" in err
        assert not (tmp_path / "jobs.results.jsonl").exists()
        with socket.socket() as taken:  # a busy metrics port: said before the results file is made
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            proc = await spawn("run", str(jobs), "--config", str(config), "--metrics-port",
                               str(taken.getsockname()[1]), cwd=tmp_path)
            code, err = await finish(proc)
        assert code == 2 and "already in use" in err
        assert not (tmp_path / "jobs.results.jsonl").exists()
        assert server.messages == []
        assert len(server.auth_attempts) == 1  # the login is tried once, before any line is read


async def test_a_relay_down_from_the_start_records_nothing(tmp_path: Path) -> None:
    server = FaultyServer()
    await server.start()
    port = server.port
    await server.stop()  # nothing listens
    jobs = write_jobs(tmp_path / "jobs.jsonl", ["not json"] + [job(i) for i in range(5)])
    config = tmp_path / "c.yaml"
    config.write_text(f"smtp:\n  hostname: 127.0.0.1\n  port: {port}\n  relay_down_timeout: 0.5\n"
                      "retry:\n  backoff_base: 0.01\n  backoff_max: 0.05\n")
    proc = await spawn("run", str(jobs), "--config", str(config), cwd=tmp_path)
    code, err = await finish(proc)
    assert code == 3, err
    assert "unreachable" in err
    assert not (tmp_path / "jobs.results.jsonl").exists()  # not even the invalid line: run it again later


@pytest.mark.parametrize("compose_process", ["--compose-process", "--no-compose-process"])
async def test_blank_lines_are_counted_as_read_and_said(
    server: FaultyServer, tmp_path: Path, compose_process: str
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1), "", job(2), "   ", job(3), ""])
    config = write_config(tmp_path / "c.yaml", server)
    proc = await spawn("run", str(jobs), "--config", str(config), compose_process, "--no-progress",
                       "--metrics-textfile", "m.prom", cwd=tmp_path)
    code, err = await finish(proc)
    assert code == 0, err
    summary = json.loads(err.splitlines()[-1])
    assert summary["event"] == "run.summary" and summary["sent"] == 3 and summary["blank_lines"] == 3
    assert "dispatcher_jobs_read_total 6.0" in (tmp_path / "m.prom").read_text()


# -- 11. the compose process is reaped when it ends ------------------------------------------


async def test_the_compose_process_is_reaped_as_soon_as_it_ends(
    server: FaultyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compose = compose_module._child

    def slow_to_exit(*args: Any) -> None:  # in the child: its exit comes after its last frame is read
        compose(*args)
        time.sleep(0.5)

    monkeypatch.setattr(compose_module, "_child", slow_to_exit)
    server.gate = asyncio.Event()  # the run goes on (messages wait at end-of-DATA) after the child is done
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(5)])
    settings = load_settings(write_config(tmp_path / "c.yaml", server, size=2, queue_size=10))
    run = Run(RunOptions(jobs=str(jobs), results=tmp_path / "r.jsonl", progress=False, compose_process=True),
              settings)
    running = asyncio.create_task(run.execute())
    try:
        async with asyncio.timeout(20):
            while run._composing is None or run.tally.jobs_read < 5:
                await asyncio.sleep(0.01)
            child = Path(f"/proc/{run._composing.pid}")
            while child.exists():  # a zombie keeps its /proc entry until it is reaped
                assert not running.done()
                await asyncio.sleep(0.01)
        assert len(server.messages) == 0  # the run was still under way
    finally:
        server.gate.set()
    async with asyncio.timeout(20):
        assert await running == 0


# -- 12. smtp_pool_relay_up during an outage ---------------------------------------------------


async def test_relay_up_is_0_from_the_first_failed_connect_and_1_once_a_session_opens() -> None:
    server = FaultyServer()
    await server.start()
    port = server.port
    await server.stop()  # nothing listens: every connect is refused
    registry = CollectorRegistry()
    pool = SMTPPool(hostname="127.0.0.1", port=port, size=2, timeout=5, backoff_base=0.01, backoff_max=0.05,
                    relay_down_timeout=30, registry=registry)
    async with pool:
        assert registry.get_sample_value("smtp_pool_relay_up") == 1.0  # nothing known against it yet
        send = asyncio.create_task(pool.submit(make_message(1)))
        async with asyncio.timeout(10):
            while not registry.get_sample_value("smtp_pool_connect_errors_total"):
                await asyncio.sleep(0.01)
        assert registry.get_sample_value("smtp_pool_relay_up") == 0.0  # long before relay_down_timeout
        assert pool.relay_error is None and not send.done()  # the message still waits
        revived = FaultyServer(port=port)
        await revived.start()
        try:
            async with asyncio.timeout(10):
                await send
            assert registry.get_sample_value("smtp_pool_relay_up") == 1.0
        finally:
            await pool.close()
            await revived.stop()


# -- 13. a finished run's textfile says it has finished -----------------------------------------


async def test_the_metrics_textfile_carries_when_the_run_finished(server: FaultyServer, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1)])
    config = write_config(tmp_path / "c.yaml", server)
    started = time.time()
    proc = await spawn("run", str(jobs), "--config", str(config), "--metrics-textfile", "m.prom", cwd=tmp_path)
    code, err = await finish(proc)
    assert code == 0, err
    finished = [line for line in (tmp_path / "m.prom").read_text().splitlines()
                if line.startswith("dispatcher_run_finished_timestamp_seconds ")]
    assert len(finished) == 1 and started <= float(finished[0].split()[1]) <= time.time()


# -- 10. memory bounded by bytes in flight -------------------------------------------------------


async def test_the_pool_queue_is_bounded_by_bytes_as_well_as_by_messages(server: FaultyServer) -> None:
    server.gate = asyncio.Event()
    body = ("x" * 99 + "\n") * 1000  # ~101 KB a message on the wire
    messages = [make_message(i, body=body) for i in range(10)]
    pool = SMTPPool(hostname="127.0.0.1", port=server.port, size=1, queue_size=100,
                    max_bytes_in_flight=350_000)  # three of these messages
    async with pool:
        sends = [asyncio.create_task(pool.submit(m)) for m in messages]
        try:
            await server.wait_for(lambda: server.data_started >= 1, timeout=10)
            for _ in range(20):
                await asyncio.sleep(0)  # every submit has had its turn
            assert "unfinished=3" in repr(pool)  # three queued or on the wire: the other seven wait outside
        finally:
            server.gate.set()
        async with asyncio.timeout(20):
            await asyncio.gather(*sends)
    assert len(server.messages) == 10


async def test_a_run_admits_jobs_by_bytes_as_well_as_by_messages(server: FaultyServer, tmp_path: Path) -> None:
    server.gate = asyncio.Event()
    text = ("x" * 99 + "\n") * 1000
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i, text=text) for i in range(20)])
    settings = load_settings(write_config(tmp_path / "c.yaml", server, size=1, queue_size=100,
                                          max_bytes_in_flight=350_000))
    run = Run(RunOptions(jobs=str(jobs), results=tmp_path / "r.jsonl", progress=False, compose_process=False),
              settings)
    running = asyncio.create_task(run.execute())
    try:
        await server.wait_for(lambda: server.data_started >= 1, timeout=10)
        async with asyncio.timeout(10):
            while run.tally.jobs_read < 4:  # the fourth waits for room
                await asyncio.sleep(0.01)
        for _ in range(20):
            await asyncio.sleep(0)
        assert run.tally.jobs_read == 4 and "unfinished=3" in repr(run.pool)
    finally:
        server.gate.set()
    async with asyncio.timeout(30):
        assert await running == 0
    assert len(server.messages) == 20


# -- 14. the operator's view ------------------------------------------------------------------


async def test_progress_log_lines_give_the_recent_rate_the_share_and_an_eta(
    server: FaultyServer, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(40)])
    config = write_config(tmp_path / "c.yaml", server, size=1, queue_size=2)
    stalled = asyncio.Event()
    server.faults.delay = 0.1  # 40 messages take 4 s at least: the run cannot end before the stall
    server.gate = asyncio.Event()  # the relay stops answering after the first messages
    server.gate.set()
    # The period shortened from 10 s, in the child only.
    script = ("import sys, dispatcher.engine.engine as r; r.LOG_PROGRESS_EVERY = 0.05; from dispatcher.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, "run", str(jobs), "--config", str(config), cwd=tmp_path, env=ENV,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    seen: list[dict[str, Any]] = []
    try:
        async with asyncio.timeout(30):
            while True:
                line = await proc.stderr.readline()
                assert line, "the run ended"
                event = json.loads(line)
                if event["event"] != "run.progress":
                    continue
                seen.append(event)
                if not stalled.is_set() and event["sent"] >= 3:
                    server.gate.clear()  # from here on, nothing ends
                    stalled.set()
                elif stalled.is_set() and event["rate"] == 0.0:
                    break  # the recent rate, not the average since the start
    finally:
        server.gate.set()
    async with asyncio.timeout(30):
        await proc.communicate()
    assert proc.returncode == 0
    moving = next(e for e in seen if e["rate"] > 0)
    assert 0 < moving["share"] < 1 and moving["eta_s"] is not None
    assert 0 < seen[-1]["share"] < 1 and seen[-1]["eta_s"] is None  # nothing moves: no ETA made up


async def test_the_last_log_lines_on_an_80_column_terminal_wrap_at_a_space(
    server: FaultyServer, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(5)])
    config = write_config(tmp_path / "c.yaml", server)
    term = Pty(80)
    env = {**ENV, "COLUMNS": "80", "LINES": "24", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    try:
        proc = await asyncio.create_subprocess_exec(
            *DISPATCHER, "run", str(jobs), "--config", str(config), cwd=tmp_path, env=env,
            stdin=term.slave, stdout=term.slave, stderr=term.slave, start_new_session=True)
        os.close(term.slave)
        async with asyncio.timeout(45):
            code = await proc.wait()
            await term.eof.wait()
    finally:
        term.close()
    output = term.text()
    assert code == 0, output
    screen = Terminal(80)
    screen.feed(output)
    assert "run.summary" in output and "elapsed_s" in output
    assert not screen.wrapped, screen.wrapped  # every line wrapped by the program, at a space


async def test_ctrl_c_on_the_terminal_leaves_no_frozen_copy_of_the_display(
    server: FaultyServer, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(300)])
    config = write_config(tmp_path / "c.yaml", server)
    server.gate = asyncio.Event()  # the run is under way when Ctrl-C comes
    columns = 200  # one line: the bar fills the width
    term = Pty(columns)
    env = {**ENV, "COLUMNS": str(columns), "LINES": "24", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)

    def controlling_terminal() -> None:  # Ctrl-C typed on it reaches the run, and is echoed as ^C
        import fcntl
        import termios

        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    try:
        proc = await asyncio.create_subprocess_exec(
            *DISPATCHER, "run", str(jobs), "--config", str(config), cwd=tmp_path, env=env,
            stdin=term.slave, stdout=term.slave, stderr=term.slave, start_new_session=True,
            preexec_fn=controlling_terminal)
        os.close(term.slave)
        await term.until(lambda out: "msg/s" in out)
        os.write(term.master, b"\x03")  # Ctrl-C
        await term.until(lambda out: "run.stopping" in out)
        server.gate.set()
        async with asyncio.timeout(45):
            code = await proc.wait()
            await term.eof.wait()
    finally:
        server.gate.set()
        term.close()
    output = term.text()
    assert code == 130, output
    screen = Terminal(columns)
    screen.feed(output)
    lines = screen.lines()
    assert "^C" in output
    assert sum("━" in line for line in lines) == 1, "\n".join(lines)  # the last state, and no frozen copy


def test_lines_stderr_cannot_take_at_once_are_dropped_counted_and_said_at_the_end() -> None:
    read_end, write_end = os.pipe()
    with open(write_end, "w", closefd=True) as pipe:
        stream = DroppingStream(pipe, limit=1 << 16)  # the pipe holds 64 KiB more
        line = "x" * 99
        for _ in range(5000):  # 500 KB, nobody reading: the writer thread blocks, the buffer fills
            print(line, file=stream)  # never blocks
        assert stream.dropped > 0
        dropped = stream.dropped
        received = bytearray()

        def drain() -> None:
            while not received.endswith(b"at once\n") and (chunk := os.read(read_end, 1 << 16)):
                received.extend(chunk)

        reader = threading.Thread(target=drain)
        reader.start()
        stream.finish(timeout=10)
        reader.join(10)
    os.close(read_end)
    lines = received.decode().splitlines()
    assert all(text == line for text in lines[:-1])  # whole lines only, in order
    assert lines[-1] == f"dispatcher: {dropped} log line(s) dropped: standard error did not take them at once"
    assert len(lines) - 1 + dropped == 5000


async def test_relays_that_all_refuse_the_login_record_nothing(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", ["not json"] + [job(i) for i in range(5)])
    async with FaultyServer(credentials=("user", "right")) as a, FaultyServer(credentials=("user", "right")) as b:
        login = "  start_tls: false\n  username: user\n  password: wrong\n"
        config = tmp_path / "c.yaml"
        config.write_text(f"relays:\n  - name: a\n    hostname: 127.0.0.1\n    port: {a.port}\n"
                          + login.replace("  ", "    ", 1).replace("\n  ", "\n    ")
                          + f"  - name: b\n    hostname: 127.0.0.1\n    port: {b.port}\n"
                          + login.replace("  ", "    ", 1).replace("\n  ", "\n    "))
        proc = await spawn("run", str(jobs), "--config", str(config), cwd=tmp_path)
        code, err = await finish(proc)
        assert code == 2, err
        assert "refused the login: 535" in err
        assert not (tmp_path / "jobs.results.jsonl").exists()
        assert len(a.auth_attempts) == len(b.auth_attempts) == 1
