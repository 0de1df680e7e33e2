"""``dispatcher run`` with the compose stage in a second process (the default for a
jobs file on 2+ cores) against the same run composing in-process: the same results,
line by line, for every kind of line; resume and duplicates alike; the child never
outlives the run, never holds the results file's lock, and a crash of it stops the run
with one line instead of hanging."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
from smtpserver import FaultyServer
from test_dispatcher import delivered_ids, dispatcher, job, write_config, write_jobs
from test_run_faults import finish, lines_of, spawn

pytestmark = pytest.mark.timeout(60)

MODES = ["--compose-process", "--no-compose-process"]


def tricky_jobs(tmp_path: Path) -> list[dict[str, Any] | str]:
    (tmp_path / "files").mkdir(exist_ok=True)
    (tmp_path / "files" / "a.txt").write_text("attached\n")
    return [
        job(1),
        "not json",
        job(2, to=["not an address"]),
        job(1, subject="duplicate of line 1"),
        {"id": "y" * 2000},
        job(3, attachments=[{"filename": "a.txt", "path": "files/a.txt"}]),
        job(4, attachments=[{"filename": "p", "path": "../../../../etc/passwd"}]),
        job(5, attachments=[{"filename": "b.bin", "content_base64": base64.b64encode(b"\x00\x01").decode()}]),
        job(6, subject="Grüße, ünïcødé ✓"),
        {"id": "raw-1", "mail_from": "a@example.org", "rcpt_to": ["r@example.net"], "raw": "Subject: r\n\nbody\n"},
        job(7, headers={"X-Bad": "a\r\nBcc: victim@example.net"}),
        job(8, id=123456789012345678901234567890),  # an integer id beyond 64 bits, read exactly
        "",
        job(9),
    ]


def comparable(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return sorted((r["line"], r["id"], r["status"], r["error"], r["attempts"]) for r in rows)


async def test_the_compose_process_records_exactly_what_composing_in_process_records(
    server: FaultyServer, tmp_path: Path
) -> None:
    outcomes = {}
    work = tmp_path
    jobs = write_jobs(work / "jobs.jsonl", tricky_jobs(work))
    config = write_config(work / "c.yaml", server)
    for mode in MODES:
        (work / "jobs.results.jsonl").unlink(missing_ok=True)
        server.messages.clear()
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), mode, "--no-progress", cwd=work)
        assert code == 1, err  # some lines are invalid
        outcomes[mode] = comparable(lines_of(work / "jobs.results.jsonl")), sorted(map(str, delivered_ids(server)))
        # Run again: everything is skipped, nothing sent, nothing recorded twice.
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), mode, "--no-progress", cwd=work)
        assert code == 1, err  # the invalid lines are still not sent
        assert comparable(lines_of(work / "jobs.results.jsonl")) == outcomes[mode][0]
    assert outcomes[MODES[0]] == outcomes[MODES[1]]
    rows, sent = outcomes[MODES[0]]
    assert sent == ["None", "job-1", "job-3", "job-5", "job-6", "job-8", "job-9"]
    assert (12, "123456789012345678901234567890", "sent", None, 1) in rows
    assert [r[2] for r in rows] == ["sent", "invalid", "invalid", "invalid", "invalid", "sent", "invalid", "sent",
                                   "sent", "sent", "invalid", "sent", "sent"]


def children_of(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry))
    return found


async def mid_run(server: FaultyServer, tmp_path: Path, count: int) -> tuple[Path, Path, Any, int]:
    """A run with a compose process, its first messages held on the wire by the server's
    gate: (jobs, config, the run's process, the compose process's pid)."""
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(count)])
    config = write_config(tmp_path / "c.yaml", server)
    server.gate = asyncio.Event()
    proc = await spawn("run", str(jobs), "--config", str(config), "--compose-process", "--no-progress",
                       cwd=tmp_path)
    await server.wait_for(lambda: server.data_started >= 1, timeout=20)
    (child,) = children_of(proc.pid)
    return jobs, config, proc, child


async def test_kill_9_mid_run_leaves_no_compose_process_and_the_rerun_is_not_locked_out(
    server: FaultyServer, tmp_path: Path
) -> None:
    jobs, config, proc, child = await mid_run(server, tmp_path, 3000)
    proc.kill()
    await proc.wait()
    assert server.gate is not None
    server.gate.set()
    # The child dies on its next write to the broken pipe.
    async with asyncio.timeout(10):
        while Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]:
            await asyncio.sleep(0.02)
    server.gate = None
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
    assert code == 0, err  # not "results file is in use": the child never held the lock
    assert set(delivered_ids(server)) == {f"job-{i}" for i in range(3000)}


async def test_sigint_stops_the_run_and_its_compose_process(server: FaultyServer, tmp_path: Path) -> None:
    _, _, proc, child = await mid_run(server, tmp_path, 3000)
    proc.send_signal(signal.SIGINT)
    assert server.gate is not None
    server.gate.set()
    code, err = await finish(proc)
    assert code == 130, err
    assert "Traceback" not in err
    assert not Path(f"/proc/{child}").exists()  # killed and reaped by the run


async def test_a_compose_process_that_dies_stops_the_run_with_one_line(server: FaultyServer, tmp_path: Path) -> None:
    _, _, proc, child = await mid_run(server, tmp_path, 5000)
    os.kill(child, signal.SIGKILL)
    assert server.gate is not None
    server.gate.set()
    code, err = await finish(proc)
    assert code == 2, err
    assert "the compose process ended before the last job" in err, err
    rows = lines_of(tmp_path / "jobs.results.jsonl")
    assert {r["status"] for r in rows} <= {"sent"}  # what was sent is recorded; the rest is for the next run
    assert len(rows) == len(set(delivered_ids(server)))


def summary(err: str) -> dict[str, Any]:
    return next(json.loads(line) for line in err.splitlines() if '"run.summary"' in line)


@pytest.mark.parametrize("mode", MODES)
async def test_a_rerun_does_not_compose_the_lines_an_earlier_run_finished(
    server: FaultyServer, tmp_path: Path, mode: str
) -> None:
    """Done lines are skipped before they are rendered, read or signed, in the compose
    process too (it asks the journal as loaded): a finished batch with big attachments
    resumes in no time, not in seconds and a gigabyte."""
    attachment = tmp_path / "report.pdf"
    attachment.write_bytes(b"x" * 1024)
    count = 150
    jobs = write_jobs(tmp_path / "jobs.jsonl",
                      [job(i, attachments=[{"filename": "report.pdf", "path": "report.pdf"}]) for i in range(count)])
    config = write_config(tmp_path / "c.yaml", server)
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), mode, "--no-progress", cwd=tmp_path)
    assert code == 0, err
    attachment.write_bytes(os.urandom(4 << 20))  # regenerated since: irrelevant to a batch all done
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), mode, "--no-progress", cwd=tmp_path)
    assert code == 0, err
    assert len(server.messages) == count and len(lines_of(tmp_path / "jobs.results.jsonl")) == count
    done = summary(err)
    assert done["skipped"] == count
    assert done["elapsed_s"] < 2.0, f"{mode}: {done['elapsed_s']} s to skip {count} done lines"


async def test_jobs_on_standard_input_are_composed_as_they_come_even_when_asked_for_a_process(
    server: FaultyServer, tmp_path: Path
) -> None:
    """A pipe is read line by line in-process: a compose process would hold a slow
    producer's line until a batch fills."""
    config = write_config(tmp_path / "c.yaml", server)
    proc = await spawn("run", "-", "--config", str(config), "--results", "out.jsonl", "--compose-process",
                       "--no-progress", cwd=tmp_path, stdin=asyncio.subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write((json.dumps(job(1)) + "\n").encode())
    await proc.stdin.drain()
    await server.wait_for(lambda: len(server.messages) >= 1, timeout=10)
    proc.stdin.close()
    code, err = await finish(proc)
    assert code == 0, err
    assert [r["status"] for r in lines_of(tmp_path / "out.jsonl")] == ["sent"]


# -- several compose processes (jobs.compose_processes; one per core with DKIM) -------------


BIG_TEXT = "Hello, this line makes the message long enough to fill pipes.\n" * 40  # 2.5 KB


def config_with(path: Path, server: FaultyServer, extra: str) -> Path:
    write_config(path, server)
    with path.open("a") as out:
        out.write(extra)
    return path


def many_jobs(tmp_path: Path, count: int = 2500) -> list[dict[str, Any] | str]:
    """Lines of every kind spread over several blocks of BATCH_LINES, so that each child
    composes some: duplicates whose first copy another child composed, blank lines.
    More than the pipe holds, so that the children are still there mid-run."""
    lines: list[dict[str, Any] | str] = [job(i, text=BIG_TEXT) for i in range(count)]
    tricky = tricky_jobs(tmp_path)
    for at, item in zip((3, 64, 65, 127, 128, 130, 191, 200, 257, 300, 333, 350, 380, 399), tricky, strict=False):
        lines[at] = item
    lines[100] = job(5, subject="duplicate of line 6, another child's block")
    lines[201] = "   "
    return lines


@pytest.mark.parametrize("processes", [2, 3])
async def test_n_compose_processes_record_exactly_what_composing_in_process_records(
    server: FaultyServer, tmp_path: Path, processes: int
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", many_jobs(tmp_path))
    config = write_config(tmp_path / "in-process.yaml", server)
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-compose-process",
                                    "--no-progress", cwd=tmp_path)
    assert code == 1, err
    expected = comparable(lines_of(tmp_path / "jobs.results.jsonl")), sorted(map(str, delivered_ids(server)))
    expected_summary = summary(err)
    (tmp_path / "jobs.results.jsonl").unlink()
    server.messages.clear()

    config = config_with(tmp_path / "n.yaml", server, f"jobs:\n  compose_processes: {processes}\n")
    server.gate = asyncio.Event()
    before = server.data_started
    proc = await spawn("run", str(jobs), "--config", str(config), "--compose-process", "--no-progress",
                       cwd=tmp_path)
    await server.wait_for(lambda: server.data_started > before, timeout=20)
    found = len(children_of(proc.pid))
    server.gate.set()
    server.gate = None
    code, err = await finish(proc)
    assert found == processes, err
    assert code == 1, err
    assert (comparable(lines_of(tmp_path / "jobs.results.jsonl")), sorted(map(str, delivered_ids(server)))) == expected
    done = summary(err)
    assert {k: done[k] for k in ("sent", "invalid", "blank_lines")} == \
        {k: expected_summary[k] for k in ("sent", "invalid", "blank_lines")}
    # Resumed: every line is skipped, nothing sent or recorded again.
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
    assert code == 1, err
    assert comparable(lines_of(tmp_path / "jobs.results.jsonl")) == expected[0]
    assert sorted(map(str, delivered_ids(server))) == expected[1]


async def test_kill_9_with_n_compose_processes_leaves_none_and_the_rerun_sends_the_rest_once(
    server: FaultyServer, tmp_path: Path
) -> None:
    count = 3000
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i, text=BIG_TEXT) for i in range(count)])
    config = config_with(tmp_path / "c.yaml", server, "jobs:\n  compose_processes: 3\n")
    server.gate = asyncio.Event()
    proc = await spawn("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
    await server.wait_for(lambda: server.data_started >= 1, timeout=20)
    children = children_of(proc.pid)
    assert len(children) == 3
    proc.kill()
    await proc.wait()
    server.gate.set()
    # Each child ends: on the broken pipe, or when the one before it in the ring has.
    async with asyncio.timeout(10):
        while any(Path(f"/proc/{child}").exists() and "Z" not in Path(f"/proc/{child}/stat").read_text().split()[2]
                  for child in children):
            await asyncio.sleep(0.02)
    server.gate = None
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
    assert code == 0, err
    assert set(delivered_ids(server)) == {f"job-{i}" for i in range(count)}
    rows = lines_of(tmp_path / "jobs.results.jsonl")
    assert sorted(r["id"] for r in rows) == sorted(f"job-{i}" for i in range(count))  # each recorded once
    assert {r["status"] for r in rows} == {"sent"}


@pytest.mark.parametrize("which", [0, 1])
async def test_one_of_n_compose_processes_dying_stops_the_run_with_one_line(
    server: FaultyServer, tmp_path: Path, which: int
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i, text=BIG_TEXT) for i in range(5000)])
    config = config_with(tmp_path / "c.yaml", server, "jobs:\n  compose_processes: 3\n")
    server.gate = asyncio.Event()
    proc = await spawn("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
    await server.wait_for(lambda: server.data_started >= 1, timeout=20)
    children = sorted(children_of(proc.pid))
    assert len(children) == 3
    os.kill(children[which], signal.SIGKILL)
    server.gate.set()
    code, err = await finish(proc)
    assert code == 2, err
    assert "the compose process ended before the last job" in err, err
    assert "Traceback" not in err
    assert not any(Path(f"/proc/{child}").exists() for child in children)  # all ended and reaped
    rows = lines_of(tmp_path / "jobs.results.jsonl")
    assert {r["status"] for r in rows} <= {"sent"}
    assert len(rows) == len(set(delivered_ids(server)))


async def test_with_dkim_one_compose_process_per_core_signs(server: FaultyServer, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    from dispatcher.compose.process import cores

    if cores() < 2:
        pytest.skip("one core: the run composes in-process")
    key = ed25519.Ed25519PrivateKey.generate()
    (tmp_path / "dkim.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i, text=BIG_TEXT) for i in range(2500)])
    config = config_with(tmp_path / "c.yaml", server, "dkim:\n  domain: example.org\n  selector: s\n"
                         f"  private_key: {tmp_path / 'dkim.pem'}\n  algorithm: ed25519-sha256\n")
    server.gate = asyncio.Event()
    proc = await spawn("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
    await server.wait_for(lambda: server.data_started >= 1, timeout=20)
    assert len(children_of(proc.pid)) == min(cores(), 64)
    server.gate.set()
    server.gate = None
    code, err = await finish(proc)
    assert code == 0, err
    assert sorted(delivered_ids(server)) == sorted(f"job-{i}" for i in range(2500))
    assert all(m.content.startswith(b"DKIM-Signature: v=1; a=ed25519-sha256") for m in server.messages)


def _frames(fd: int) -> list[tuple[Any, ...]]:
    """The frames waiting in a pipe (non-blocking)."""
    import pickle
    import select

    from dispatcher.compose.process import _HEAD

    data = b""
    while select.select([fd], [], [], 0)[0]:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    frames = []
    while data:
        (length,) = _HEAD.unpack_from(data)
        frames.append(pickle.loads(data[_HEAD.size:_HEAD.size + length]))
        data = data[_HEAD.size + length:]
    return frames


def test_a_compose_process_composes_ahead_of_its_turn_up_to_a_bound() -> None:
    """Blocks composed before the turn comes are held (not waited on) up to
    AHEAD_BLOCKS; written one a turn, oldest first; past the bound the process waits."""
    import threading

    from dispatcher.compose.process import AHEAD_BLOCKS, _Turn, _Writer

    out_r, out_w = os.pipe()
    inbound_r, inbound_w = os.pipe()  # the child before us passes the turn here
    outbound_r, outbound_w = os.pipe()  # we pass it to the next
    try:
        writer = _Writer(out_w, _Turn(inbound_r, outbound_w, held=False))
        for block in range(AHEAD_BLOCKS):  # none of them waits: the turn has not come
            writer.add(("B", block, [f"block {block}"]))
            writer.close_block()
        assert _frames(out_r) == []
        os.write(inbound_w, b"t")
        writer.add(("B", AHEAD_BLOCKS, ["next block, being composed"]))  # the turn has come: the oldest goes out
        assert _frames(out_r) == [("B", 0, ["block 0"])]
        assert os.read(outbound_r, 1) == b"t"  # and the turn goes on at once
        writer.close_block()  # AHEAD_BLOCKS complete blocks held again: at the bound, not past it
        assert _frames(out_r) == []
        done = threading.Event()

        def one_more() -> None:
            writer.add(("B", 99, ["past the bound"]))
            writer.close_block()
            done.set()

        thread = threading.Thread(target=one_more, daemon=True)
        thread.start()
        assert not done.wait(0.3)  # past the bound it waits for its turn
        os.write(inbound_w, b"t")
        assert done.wait(10)
        thread.join(10)
        assert _frames(out_r) == [("B", 1, ["block 1"])]
        assert os.read(outbound_r, 1) == b"t"
    finally:
        for fd in (out_r, out_w, inbound_r, inbound_w, outbound_r, outbound_w):
            os.close(fd)


def test_a_composed_job_comes_back_with_its_dsn_envid_so_the_loop_only_submits() -> None:
    """The compose process works out the ENVID (RFC 3461: the job id when it is printable
    ASCII of at most 100 characters as xtext): the event loop submits the envelope as is."""
    from dispatcher.compose.jobs import Outgoing
    from dispatcher.compose.process import _decode, _encode
    from dispatcher.compose.stage import Ready

    message = b"Subject: x\r\nMessage-ID: <1@example.org>\r\n\r\nHi\r\n"
    for job_id, envid in (("job-7", "job-7"), ("é", None), ("+" * 40, None)):
        outgoing = Outgoing(message, "bounces@example.org", ["a@example.net"], prepared=True)
        number, size, ready = _decode(_encode(3, 99, Ready(3, job_id, outgoing)))
        assert (number, size) == (3, 99) and isinstance(ready, Ready)
        envelope = ready.outgoing.envelope
        assert envelope is not None and envelope.envelope_id == envid
        assert envelope.recipients == ("a@example.net",) and envelope.message_id == "<1@example.org>"
