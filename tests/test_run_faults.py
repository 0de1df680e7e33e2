"""``dispatcher run`` under faults (issue 13): every result recordable, no hang on any
failure, duplicates and unreadable lines on resume, attachment paths, slow standard
input, signals under a rate limit, unreadable files, a locked results file, digest
collisions. Real servers (tests/smtpserver.py) and the command in a subprocess, but for
the tests that need to replace a function inside the run (in process)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from smtpserver import FaultyServer
from test_dispatcher import (
    DISPATCHER,
    ROOT,
    delivered_ids,
    dispatcher,
    job,
    results,
    write_config,
    write_jobs,
)

import dispatcher.batch.journal as journal_module
from dispatcher.batch.journal import Claim, Journal
from dispatcher.batch.runner import Run, RunOptions
from dispatcher.config import load_settings
from dispatcher.exit import ExitCode

pytestmark = pytest.mark.timeout(60)

ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


async def spawn(*args: str, cwd: Path, **kwargs: Any) -> asyncio.subprocess.Process:
    kwargs.setdefault("stdin", asyncio.subprocess.DEVNULL)
    kwargs.setdefault("stdout", asyncio.subprocess.DEVNULL)
    kwargs.setdefault("stderr", asyncio.subprocess.PIPE)
    return await asyncio.create_subprocess_exec(*DISPATCHER, *args, cwd=cwd, env=ENV, **kwargs)


async def finish(proc: asyncio.subprocess.Process, timeout: float = 20) -> tuple[int, str]:
    """Wait for the process to end by itself (a hang fails the test) -> (exit, stderr)."""
    async with asyncio.timeout(timeout):
        _, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, (err or b"").decode(errors="replace")


async def poll(predicate: Callable[[], bool], timeout: float = 10) -> None:
    """For what another process writes to a file, where there is no event to await."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


# -- 1. every result is recordable --------------------------------------------------


async def test_reply_that_is_not_utf8_and_an_id_with_a_lone_surrogate_are_recorded_once(
    server: FaultyServer, tmp_path: Path
) -> None:
    server.faults.data_reply_raw = b"250 Ok: re\xe7u"
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1), json.dumps(job(2, id="bad-\ud800"))])
    config = write_config(tmp_path / "c.yaml", server)
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 1, err  # the lone surrogate makes job 2 invalid; nothing crashed
    assert "Traceback" not in err
    raw = (tmp_path / "jobs.results.jsonl").read_bytes()
    sent, invalid = sorted(lines_of(tmp_path / "jobs.results.jsonl"), key=lambda r: r["line"])
    assert sent["status"] == "sent" and sent["response"].startswith("Ok: re") and "\ufffd" in sent["response"]
    assert invalid["status"] == "invalid" and invalid["id"] == "bad-\ud800" and invalid["line"] == 2
    raw.decode("utf-8")  # every line is valid UTF-8 JSON
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 1, err  # both recorded: the re-run skips them (ids matched on resume); one is invalid
    assert (tmp_path / "jobs.results.jsonl").read_bytes() == raw
    assert delivered_ids(server) == {"job-1": 1}


def test_a_result_whose_text_utf8_cannot_encode_is_written_with_ascii_escapes(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    journal = Journal(path)
    journal.open()
    journal.record({"id": "x\ud800", "line": 1, "status": "sent", "response": "re\udce7u"})
    journal.record({"id": "plain", "line": 2, "status": "sent", "response": "Grüße"})
    journal.close()
    first, second = path.read_bytes().splitlines()
    assert first.isascii() and json.loads(first)["id"] == "x\ud800"
    assert "Grüße".encode() in second  # ordinary lines stay readable UTF-8
    again = Journal(path)
    again.open()
    assert again.claim("x\ud800", 1)[0] is Claim.DONE and again.claim("plain", 2)[0] is Claim.DONE
    again.close()


# -- 2. a failure stops the run; stderr closed ----------------------------------------


def _limit_file_size(limit: int) -> Callable[[], None]:
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


async def test_results_file_that_cannot_be_written_stops_the_run_at_once(
    server: FaultyServer, tmp_path: Path
) -> None:
    count, size, queue_size = 400, 2, 10
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(count)])
    config = write_config(tmp_path / "c.yaml", server, size=size, queue_size=queue_size)
    # RLIMIT_FSIZE: the results file is "full" after ~4 KB (EFBIG, as on a full disk).
    proc = await asyncio.create_subprocess_exec(
        *DISPATCHER, "run", str(jobs), "--config", str(config), cwd=tmp_path, env=ENV,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE, preexec_fn=_limit_file_size(4096))
    code, err = await finish(proc)
    assert code == ExitCode.USAGE, err
    message = [line for line in err.splitlines() if line.startswith("dispatcher:")]
    assert "cannot write the results file" in message[0] and "File too large" in message[0]
    assert "Traceback" not in err
    written = (tmp_path / "jobs.results.jsonl").read_bytes()
    assert written.endswith(b"\n"), "a torn line was left behind"
    recorded = [json.loads(line) for line in written.splitlines()]  # every line whole
    assert 0 < len(recorded) < count
    assert len(server.messages) < count, "it stopped, it did not go on sending"
    # Every delivered message is either recorded or named on stderr: none is forgotten.
    unrecorded = len(server.messages) - len(recorded)
    if unrecorded:
        assert len(message) == 2 and message[1].startswith(f"dispatcher: {unrecorded} message(s) were delivered "
                                                           "but their results could not be written"), message
    else:
        assert len(message) == 1, message
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    ids = delivered_ids(server)
    assert set(ids) == {f"job-{i}" for i in range(count)}
    # Sent but not recorded: at most what was submitted when the file failed.
    assert sum(n - 1 for n in ids.values()) <= size + queue_size + 1


@pytest.mark.parametrize("how", ["closed", "head"])
async def test_a_closed_standard_error_neither_hangs_nor_stops_the_run(
    server: FaultyServer, tmp_path: Path, how: str
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(40)] + ["not json"])
    config = write_config(tmp_path / "c.yaml", server)
    if how == "closed":
        read_end, write_end = os.pipe()
        os.close(read_end)  # every write to stderr fails with EPIPE, from the first one
        try:
            proc = await spawn("run", str(jobs), "--config", str(config), cwd=tmp_path, stderr=write_end)
        finally:
            os.close(write_end)
        code, _ = await finish(proc)
    else:
        shell = (f"{' '.join(DISPATCHER)} run {jobs} --config {config} 2>&1 | head -1; "
                 "echo exit=${PIPESTATUS[0]}")
        proc = await asyncio.create_subprocess_exec("bash", "-c", shell, cwd=tmp_path, env=ENV,
                                                    stdout=asyncio.subprocess.PIPE)
        async with asyncio.timeout(20):
            out, _ = await proc.communicate()
        first, status = out.decode().splitlines()
        assert first.startswith("{")  # the first log line made it through head
        code = int(status.removeprefix("exit="))
    assert code == 1  # the invalid line; every other job sent and recorded
    statuses = sorted(r["status"] for r in results(tmp_path / "jobs.results.jsonl"))
    assert statuses == ["invalid"] + ["sent"] * 40


async def test_a_bug_in_a_sender_stops_the_run_with_one_line_instead_of_hanging(
    server: FaultyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import dispatcher.batch.ledger as ledger_module

    def broken(*args: Any, **fields: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(ledger_module, "result_row", broken)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(300)])
    settings = load_settings(write_config(tmp_path / "c.yaml", server, size=2, queue_size=5))
    run = Run(RunOptions(jobs=str(jobs), results=tmp_path / "r.jsonl", progress=False), settings)
    async with asyncio.timeout(20):
        code = await run.execute()
    assert code == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "dispatcher: internal error on line 1: RuntimeError: boom" in err
    assert len(server.messages) < 300


# -- 3. duplicates and unreadable ids on resume ---------------------------------------


async def test_a_duplicate_id_never_marks_the_first_line_done(server: FaultyServer, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job("x"), job("x", subject="the duplicate")])
    config = write_config(tmp_path / "c.yaml", server)
    server.gate = asyncio.Event()  # line 1 stays on the wire
    proc = await spawn("run", str(jobs), "--config", str(config), cwd=tmp_path)
    await server.wait_for(lambda: server.data_started >= 1, timeout=20)
    proc.kill()  # kill -9 with line 1 in flight; line 2 (read first) is recorded
    await proc.wait()
    (row,) = lines_of(tmp_path / "jobs.results.jsonl")
    assert (row["line"], row["status"], row["id"]) == (2, "invalid", None)
    assert "duplicate of line 1's id 'job-x'" in row["error"]
    server.gate = None
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 1, err  # line 1 sent now; the duplicate on line 2 never is
    rows = lines_of(tmp_path / "jobs.results.jsonl")
    assert [(r["line"], r["status"]) for r in rows] == [(2, "invalid"), (1, "sent")]
    assert [m.header("Subject") for m in server.messages] == ["message x"]


async def test_a_line_without_a_readable_id_is_recorded_once(server: FaultyServer, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        job(1), "not json", {"from": "a@example.org"}, job(2, id=""), {"id": "y" * 2000}, job(1)])
    config = write_config(tmp_path / "c.yaml", server)
    for _ in range(2):  # the re-run records nothing again, and still says not everything was sent
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
        assert code == 1, err
    rows = lines_of(tmp_path / "jobs.results.jsonl")
    assert sorted(r["line"] for r in rows) == [1, 2, 3, 4, 5, 6]
    assert all(r["id"] is None for r in rows if r["line"] != 1)
    # A line fixed since is judged by its id, not skipped by its number.
    write_jobs(jobs, [job(1), job("fixed"), {"from": "a@example.org"}, job(2, id=""), {"id": "y" * 2000}, job(1)])
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 1, err  # lines 3-6 are still invalid
    assert [(r["line"], r["status"]) for r in lines_of(tmp_path / "jobs.results.jsonl")[6:]] == [(2, "sent")]
    assert sorted(delivered_ids(server)) == ["job-1", "job-fixed"]


# -- 5. attachment paths ------------------------------------------------------------------


async def test_attachment_paths_stay_inside_the_root_and_name_regular_files(
    server: FaultyServer, tmp_path: Path
) -> None:
    here = tmp_path / "campaign"
    (here / "files").mkdir(parents=True)
    (here / "files" / "a.txt").write_text("inside the root")
    (tmp_path / "secret.txt").write_text("outside the root")
    (here / "files" / "link.txt").symlink_to(tmp_path / "secret.txt")
    os.mkfifo(here / "files" / "fifo")
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "logo.txt").write_text("shared file")

    def attach(n: str, path: str) -> dict[str, Any]:
        return job(n, attachments=[{"filename": "f.txt", "path": path}])

    jobs = write_jobs(here / "jobs.jsonl", [
        attach("relative", "files/a.txt"),
        attach("dotdot", "../secret.txt"),
        attach("absolute", str(tmp_path / "secret.txt")),
        attach("symlink", "files/link.txt"),
        attach("fifo", "files/fifo"),
        attach("directory", "files"),
        attach("shared", "../shared/logo.txt"),
    ])
    config = write_config(tmp_path / "c.yaml", server)
    # From another directory: paths are relative to the jobs file, not to the cwd.
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path / "shared")
    assert code == 1, err
    by_id = {r["id"]: r for r in results(here / "jobs.results.jsonl")}
    assert by_id["job-relative"]["status"] == "sent"
    for name, why in (("dotdot", "outside the attachments root"), ("absolute", "outside the attachments root"),
                      ("symlink", "outside the attachments root"), ("fifo", "not a regular file"),
                      ("directory", "not a regular file"), ("shared", "outside the attachments root")):
        row = by_id[f"job-{name}"]
        assert row["status"] == "invalid" and row["error"].startswith(f"line {row['line']}: attachments.0.path: ")
        assert why in row["error"], row
    content = b"".join(m.content for m in server.messages)
    assert b"b3V0c2lkZSB0aGUgcm9vdA" not in content  # base64 of "outside the root"
    assert len(server.messages) == 1
    # --attachments-root widens it (and config jobs.attachments_root does the same).
    (here / "jobs.results.jsonl").unlink()
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--attachments-root",
                                    str(tmp_path / "shared" / ".."), "--results", str(tmp_path / "r2.jsonl"),
                                    cwd=tmp_path)
    by_id = {r["id"]: r for r in results(tmp_path / "r2.jsonl")}
    assert by_id["job-shared"]["status"] == by_id["job-dotdot"]["status"] == "sent"
    assert by_id["job-fifo"]["status"] == "invalid"
    config.write_text(config.read_text() + f"jobs:\n  attachments_root: {tmp_path / 'shared'}\n")
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--results",
                                    str(tmp_path / "r3.jsonl"), cwd=tmp_path)
    by_id = {r["id"]: r for r in results(tmp_path / "r3.jsonl")}
    assert by_id["job-shared"]["status"] == "sent" and by_id["job-relative"]["status"] == "invalid"
    code, _, err = await dispatcher("run", str(jobs), "--attachments-root", str(tmp_path / "nope"), cwd=tmp_path)
    assert code == 2 and "not a directory" in err


# -- 6. standard input, a line at a time ----------------------------------------------------


async def test_jobs_on_a_slow_standard_input_are_sent_as_they_come_and_signals_work_meanwhile(
    server: FaultyServer, tmp_path: Path
) -> None:
    config = write_config(tmp_path / "c.yaml", server)
    proc = await spawn("run", "-", "--config", str(config), "--results", "out.jsonl", cwd=tmp_path,
                       stdin=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    for n in (1, 2):
        proc.stdin.write((json.dumps(job(n)) + "\n").encode())
        await proc.stdin.drain()
        await server.wait_for(lambda n=n: len(server.messages) >= n, timeout=10)  # type: ignore[misc]
    await poll(lambda: len(lines_of(tmp_path / "out.jsonl")) == 2)
    proc.send_signal(signal.SIGINT)  # standard input is open and idle
    code, err = await finish(proc, timeout=10)
    assert code == 130, err
    assert [r["id"] for r in results(tmp_path / "out.jsonl")] == ["job-1", "job-2"]


# -- 9. signals -------------------------------------------------------------------------------


async def test_first_signal_under_a_rate_limit_stops_at_once_without_draining_the_queue(
    server: FaultyServer, tmp_path: Path
) -> None:
    size = 2
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(1000)])
    config = write_config(tmp_path / "c.yaml", server, size=size)
    proc = await spawn("run", str(jobs), "--config", str(config), "--rate", "20", cwd=tmp_path)
    await server.wait_for(lambda: len(server.messages) >= 5, timeout=20)
    proc.send_signal(signal.SIGINT)
    at_signal, started = len(server.messages), time.monotonic()
    code, err = await finish(proc, timeout=10)
    assert code == 130, err
    assert time.monotonic() - started < 5
    assert len(server.messages) - at_signal <= size + 2
    assert "second signal stops at once" in err
    rows = lines_of(tmp_path / "jobs.results.jsonl")
    assert {r["id"] for r in rows} == set(delivered_ids(server)), "what was sent is recorded, nothing else"


async def test_second_signal_drops_the_sessions_at_once(server: FaultyServer, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(50)])
    config = write_config(tmp_path / "c.yaml", server, size=2)
    server.gate = asyncio.Event()  # the transactions on the wire never end by themselves
    proc = await spawn("run", str(jobs), "--config", str(config), cwd=tmp_path)
    await server.wait_for(lambda: server.data_started >= 2, timeout=20)
    proc.send_signal(signal.SIGTERM)
    assert proc.stderr is not None
    async with asyncio.timeout(10):
        while b"second signal" not in await proc.stderr.readline():
            pass
    proc.send_signal(signal.SIGTERM)
    code, _ = await finish(proc, timeout=5)
    assert code == 130
    assert lines_of(tmp_path / "jobs.results.jsonl") == []  # nothing finished: nothing recorded


# -- 10. unreadable files -------------------------------------------------------------------


async def test_unreadable_jobs_and_config_files_are_one_line_and_exit_2(tmp_path: Path) -> None:
    work = tmp_path / "w"
    work.mkdir()
    jobs = write_jobs(work / "jobs.jsonl", [job(1)])
    jobs.chmod(0)

    # Root reads any file: drop the capabilities that let it (util-linux setpriv).
    prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    proc = await asyncio.create_subprocess_exec(
        *prefix, *DISPATCHER, "run", "jobs.jsonl", cwd=work, env=ENV,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    code, err = await finish(proc)
    assert code == 2, err
    assert err.strip() == "dispatcher: jobs.jsonl: cannot read the jobs file: Permission denied"

    config = tmp_path / "c.yaml"
    config.write_bytes(b"smtp:\n  hostname: r\xe9lais.example.org\n")
    for command in (("check-config", str(config)), ("run", str(jobs), "--config", str(config))):
        code, _, err = await dispatcher(*command, cwd=tmp_path)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"{config}: not UTF-8 text (line 2" in err


async def test_yaml_syntax_errors_never_echo_the_file(tmp_path: Path) -> None:
    for text, problem in (('smtp:\n  hostname: x\n  password: "pa55w0rd-secret\n', "line 4"),
                          ("smtp:\n  hostname: x\n  password: *pa55w0rd-secret\n", "line 3, column 13")):
        config = tmp_path / "c.yaml"
        config.write_text(text)
        code, out, err = await dispatcher("check-config", str(config), cwd=tmp_path)
        assert code == 2 and problem in err, err
        assert "pa55w0rd" not in out + err and "password" not in err


# -- 11. one run per results file ----------------------------------------------------------------


async def test_a_second_run_on_the_same_results_file_exits_2_at_once(server: FaultyServer, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(10)])
    config = write_config(tmp_path / "c.yaml", server)
    server.gate = asyncio.Event()
    first = await spawn("run", str(jobs), "--config", str(config), cwd=tmp_path)
    await server.wait_for(lambda: server.data_started >= 1, timeout=20)
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path, timeout=10)
    assert code == 2
    assert err.strip() == f"dispatcher: {tmp_path / 'jobs.results.jsonl'}: another dispatcher run is using this results file"
    server.gate.set()
    code, err = await finish(first)
    assert code == 0, err
    assert sorted(delivered_ids(server).values()) == [1] * 10


# -- 13. digest collisions ------------------------------------------------------------------------


def test_journal_tells_ids_that_share_a_digest_apart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module, "_digest", lambda key: 0x5EED << 40)  # every key collides
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps({"id": f"done-{i}", "line": i, "status": "sent"}) + "\n" for i in range(50))
                    + json.dumps({"id": None, "line": 77, "status": "invalid"}) + "\n")
    journal = Journal(path)
    journal.open()
    assert journal.resumed == 51
    assert journal.claim("done-7", 1) == (Claim.DONE, 1)
    assert journal.claim("new", 2) == (Claim.NEW, 2)
    assert journal.claim("new", 3) == (Claim.DUPLICATE, 2)
    assert journal.claim("done-7", 4) == (Claim.DUPLICATE, 1)
    assert journal.line_done(77) and not journal.line_done(7)
    for i in range(2000):  # through several growths of the table
        assert journal.claim(f"more-{i}", 100 + i)[0] is Claim.NEW
    assert journal.claim("more-1999", 5000) == (Claim.DUPLICATE, 2099)
    journal.close()


async def test_a_run_sends_a_job_whose_id_shares_a_digest_with_a_done_one(
    server: FaultyServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(journal_module, "_digest", lambda key: 1 << 63)  # every key collides
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(6)])
    (tmp_path / "r.jsonl").write_text(json.dumps({"id": "job-0", "line": 1, "status": "sent"}) + "\n")
    settings = load_settings(write_config(tmp_path / "c.yaml", server))
    run = Run(RunOptions(jobs=str(jobs), results=tmp_path / "r.jsonl", progress=False), settings)
    async with asyncio.timeout(20):
        assert await run.execute() == 0
    assert run.tally.counts["skipped"] == 1 and run.tally.counts["sent"] == 5
    assert sorted(delivered_ids(server)) == [f"job-{i}" for i in range(1, 6)]


def test_spill_reads_back_records_from_disk_and_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(journal_module._Spill, "FLUSH_AT", 64)
    spill = journal_module._Spill()
    offsets = [spill.append(f"key-{i}".encode(), i) for i in range(100)]
    assert [spill.read(o) for o in offsets] == [(f"key-{i}".encode(), i) for i in range(100)]
    spill.close()


# -- issue 8: --retry-failed ----------------------------------------------------------------------


async def test_retry_failed_sends_only_the_transiently_refused_recipients_again(
    server: FaultyServer, tmp_path: Path
) -> None:
    server.faults.rcpt["busy@example.net"] = "450 4.2.1 mailbox busy, try later"
    server.faults.rcpt["gone@example.net"] = "550 5.1.1 no such user"
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        job("partial", to=["ok@example.net", "busy@example.net", "gone@example.net"], bcc=["hidden@example.net"]),
        job("transient", to=["busy@example.net"]),
        job("permanent", to=["gone@example.net"]),
        job("fine", to=["fine@example.net"]),
    ])
    config = tmp_path / "c.yaml"
    config.write_text(f"smtp:\n  hostname: 127.0.0.1\n  port: {server.port}\n  timeout: 5\n"
                      "retry:\n  max_attempts: 2\n  backoff_base: 0.001\n  backoff_max: 0.01\n")
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 1, err
    first = {r["id"]: r for r in results(tmp_path / "jobs.results.jsonl")}
    assert first["job-partial"]["status"] == "sent" and first["job-transient"]["status"] == "failed"
    accepted_before = sorted(r for m in server.messages for r in m.rcpt_tos)
    # Without the flag a re-run sends nothing; with it, only the 4xx recipients, once.
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 1 and sorted(r for m in server.messages for r in m.rcpt_tos) == accepted_before
    del server.faults.rcpt["busy@example.net"]
    count = len(server.messages)
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--retry-failed", cwd=tmp_path)
    assert code == 1, err  # job-permanent failed for good: the batch is not all sent
    assert '"skipped_not_sent": 1' in err
    retried = sorted((m.header("X-Job-Id"), tuple(m.rcpt_tos)) for m in server.messages[count:])
    assert retried == [("job-partial", ("busy@example.net",)), ("job-transient", ("busy@example.net",))]
    rows = results(tmp_path / "jobs.results.jsonl")[4:]
    assert sorted((r["id"], r["status"], tuple(r["recipients"])) for r in rows) == [
        ("job-partial", "sent", ("busy@example.net",)), ("job-transient", "sent", ("busy@example.net",))]
    # Everything is accepted or refused permanently now: nothing left to retry.
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--retry-failed", cwd=tmp_path)
    assert code == 1, err
    assert len(server.messages) == count + 2 and len(results(tmp_path / "jobs.results.jsonl")) == 6


def test_retry_state_follows_the_last_result_of_each_recipient(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    rows = [
        {"id": "lost", "line": 1, "status": "failed", "code": None, "refused": {}},  # connection lost
        {"id": "deferred", "line": 2, "status": "failed", "code": 451, "refused": {}},
        {"id": "rejected", "line": 3, "status": "failed", "code": 554, "refused": {}},
        {"id": "mixed", "line": 4, "status": "sent", "code": 250,
         "refused": {"b@x.org": [452, "full"], "c@x.org": [550, "no"]}},
        {"id": "mixed", "line": 4, "status": "failed", "code": 452, "refused": {"b@x.org": [452, "full"]},
         "recipients": ["b@x.org"]},  # retried once, still deferred
        {"id": "healed", "line": 5, "status": "failed", "code": 450, "refused": {}},
        {"id": "healed", "line": 5, "status": "sent", "code": 250, "refused": {}, "recipients": ["a@x.org"]},
        {"id": "bad", "line": 6, "status": "invalid", "error": "line 6: to: field required"},
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    journal = Journal(path, retry_failed=True)
    journal.open()
    everyone = ["a@x.org", "b@x.org", "c@x.org"]
    assert journal.to_retry("lost", everyone) == everyone
    assert journal.to_retry("deferred", everyone) == everyone
    assert journal.to_retry("rejected", everyone) == []
    assert journal.to_retry("mixed", everyone) == ["b@x.org"]
    assert journal.to_retry("healed", ["a@x.org"]) == [] and not journal.may_retry("healed")
    assert journal.to_retry("bad", everyone) == []
    journal.close()


async def test_sink_refuses_a_port_out_of_range(tmp_path: Path) -> None:
    code, _, err = await dispatcher("sink", "--port", "99999", "--maildir", str(tmp_path / "box"), cwd=tmp_path)
    assert code == 2 and "99999 is not a port number" in err, err
    assert not (tmp_path / "box").exists()


async def test_a_bad_flag_value_names_the_flag(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1)])
    for flag, value, said in (("--size", "0", "--size (pool.size): "), ("--rate", "-1", "--rate (pool.rate_limit): ")):
        code, _, err = await dispatcher("run", str(jobs), flag, value, cwd=tmp_path)
        assert code == 2 and err.strip().startswith(f"dispatcher: bad option: {said}"), err
        assert not (tmp_path / "jobs.results.jsonl").exists()
