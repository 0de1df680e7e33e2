"""``dispatcher`` end to end: the console script in a subprocess against real servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from _support import free_port
from smtpserver import FaultyServer

from dispatcher.batch.journal import IdSet, Journal

pytestmark = pytest.mark.timeout(60)

DISPATCHER = [sys.executable, "-m", "dispatcher.cli"]
ROOT = Path(__file__).resolve().parent.parent


async def dispatcher(
    *args: str, cwd: Path, env: dict[str, str] | None = None, stdin: bytes | None = None, timeout: float = 45
) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *DISPATCHER, *args, cwd=cwd, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(timeout):
        out, err = await proc.communicate(stdin)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


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


def write_config(path: Path, server: FaultyServer, **pool: Any) -> Path:
    pool_lines = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in (pool or {"size": 4}).items())
    path.write_text(
        f"smtp:\n  hostname: 127.0.0.1\n  port: {server.port}\n  timeout: 5\n"
        f"pool:\n{pool_lines}"
        "retry:\n  backoff_base: 0.001\n  backoff_max: 0.01\n"
    )
    return path


def results(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def delivered_ids(server: FaultyServer) -> Counter[str | None]:
    return Counter(m.header("X-Job-Id") for m in server.messages)


async def test_bad_lines_are_invalid_naming_line_and_field_and_the_batch_goes_on(
    server: FaultyServer, tmp_path: Path
) -> None:
    bad = [
        "this is not json",
        {k: v for k, v in job("no-to").items() if k != "to"},
        job("bad-address", to=["not an address"]),
        job(1, subject="duplicate id"),
        job("injection", subject="hello\r\nBcc: victim@example.net"),
        job("missing-file", attachments=[{"filename": "a.pdf", "path": str(tmp_path / "nope.pdf")}]),
        '{"id": "huge", "text": "' + "x" * (17 * 1024 * 1024) + '"}',
    ]
    lines: list[dict[str, Any] | str] = [job(1), *bad, job(2)]
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    config = write_config(tmp_path / "c.yaml", server)
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
    assert code == 1, err
    by_line = {r["line"]: r for r in results(tmp_path / "jobs.results.jsonl")}
    assert by_line[1]["status"] == by_line[9]["status"] == "sent"
    expected_fields = {2: "not valid JSON", 3: "to: field required", 4: "to.0:", 5: "id: duplicate",
                       6: "subject: contains CR or LF", 7: "attachments.0.path: cannot read", 8: "line longer than"}
    for number, text in expected_fields.items():
        assert by_line[number]["status"] == "invalid"
        assert by_line[number]["error"].startswith(f"line {number}: "), by_line[number]
        assert text in by_line[number]["error"], by_line[number]
    assert sorted(delivered_ids(server)) == ["job-1", "job-2"]
    assert b"victim" not in b"".join(m.content for m in server.messages)


async def test_rerun_after_a_clean_run_sends_nothing_again(server: FaultyServer, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(30)])
    config = write_config(tmp_path / "c.yaml", server)
    first = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    second = await dispatcher("run", str(jobs), "--config", str(config), "--metrics-textfile",
                              str(tmp_path / "m.prom"), cwd=tmp_path)
    assert (first[0], second[0]) == (0, 0)
    assert len(server.messages) == 30
    assert len(results(tmp_path / "jobs.results.jsonl")) == 30
    assert 'dispatcher_jobs_total{status="skipped"} 30.0' in (tmp_path / "m.prom").read_text()


async def test_kill_9_mid_run_then_rerun_delivers_every_id(server: FaultyServer, tmp_path: Path) -> None:
    count, size, queue_size = 1500, 4, 10
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(count)])
    config = write_config(tmp_path / "c.yaml", server, size=size, queue_size=queue_size)
    server.faults.delay = 0.001
    proc = await asyncio.create_subprocess_exec(
        *DISPATCHER, "run", str(jobs), "--config", str(config), cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    await server.wait_for(lambda: len(server.messages) >= 300, timeout=30)
    proc.kill()
    await proc.wait()
    killed_at = len(server.messages)
    assert killed_at < count, "the run was killed before it ended"
    server.faults.delay = 0
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    ids = delivered_ids(server)
    assert set(ids) == {f"job-{i}" for i in range(count)}, "every job was delivered"
    resent = sum(n - 1 for n in ids.values())
    # Only jobs submitted but not yet recorded can be sent twice: one per sender task.
    assert resent <= size + queue_size
    records = results(tmp_path / "jobs.results.jsonl")
    assert {r["id"] for r in records if r["status"] == "sent"} == set(ids)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
async def test_signal_stops_reading_finishes_in_flight_and_exits_130(
    server: FaultyServer, tmp_path: Path, signum: signal.Signals
) -> None:
    count = 1500
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(count)])
    config = write_config(tmp_path / "c.yaml", server, size=4, queue_size=10)
    server.faults.delay = 0.001
    proc = await asyncio.create_subprocess_exec(
        *DISPATCHER, "run", str(jobs), "--config", str(config), cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
    )
    await server.wait_for(lambda: len(server.messages) >= 200, timeout=30)
    proc.send_signal(signum)
    async with asyncio.timeout(30):
        _, err = await proc.communicate()
    assert proc.returncode == 130, err
    raw = (tmp_path / "jobs.results.jsonl").read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.splitlines()]  # every line whole
    assert 200 <= len(records) < count
    sent_before = {r["id"] for r in records}
    assert sent_before == set(delivered_ids(server)), "whatever was delivered was recorded"
    code, _, _ = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 0
    assert all(n == 1 for n in delivered_ids(server).values())
    assert len(delivered_ids(server)) == count


async def test_failed_and_refused_recipients_are_recorded(server: FaultyServer, tmp_path: Path) -> None:
    server.faults.rcpt["gone@example.net"] = "550 5.1.1 No such user"
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        job(1, to=["gone@example.net"]), job(2, to=["ok@example.net", "gone@example.net"])])
    code, _, _ = await dispatcher("run", str(jobs), "--config", str(write_config(tmp_path / "c.yaml", server)),
                                  cwd=tmp_path)
    assert code == 1
    failed, sent = sorted(results(tmp_path / "jobs.results.jsonl"), key=lambda r: r["id"])
    assert failed["status"] == "failed" and failed["code"] == 550
    assert failed["refused"] == {"gone@example.net": [550, "5.1.1 No such user"]}
    assert sent["status"] == "sent" and sent["refused"] == {"gone@example.net": [550, "5.1.1 No such user"]}


async def test_check_config_names_the_wrong_key_and_never_prints_the_password(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("smtp:\n  hostname: relay.example.org\n  password: ${TEST_SMTP_PW}\npool:\n  size: 3\n")
    bad = tmp_path / "bad.yaml"
    bad.write_text("smtp:\n  hostname: relay.example.org\n  port: 99999\n  password: ${TEST_SMTP_PW}\n"
                   "pool:\n  sise: 3\n")
    env = {"TEST_SMTP_PW": "pa55-w0rd-xyz"}
    code, out, err = await dispatcher("check-config", str(good), cwd=tmp_path, env=env)
    assert code == 0 and "ok" in out
    code, out, err = await dispatcher("check-config", str(bad), cwd=tmp_path, env=env)
    assert code == 2
    assert "smtp.port" in err and "pool.sise: unknown key" in err
    assert "pa55-w0rd-xyz" not in out + err
    code, _, err = await dispatcher("check-config", str(good), cwd=tmp_path)
    assert code == 2 and "smtp.password: environment variable TEST_SMTP_PW is not set" in err
    code, _, err = await dispatcher("run", "x.jsonl", "--config", str(bad), cwd=tmp_path, env=env)
    assert code == 2 and "pool.sise" in err


async def test_password_never_reaches_the_logs(tmp_path: Path) -> None:
    async with FaultyServer(credentials=("user", "right")) as server:
        config = tmp_path / "c.yaml"
        config.write_text(f"smtp:\n  hostname: 127.0.0.1\n  port: {server.port}\n  username: user\n"
                          "  password: ${PW}\n  start_tls: false\nlogging:\n  level: debug\n")
        jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1)])
        code, out, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path,
                                          env={"PW": "wrong-s3cret-value"})
    # A refused login is a permanent session failure (docs/run.md): exit 2, the reason
    # on stderr, nothing recorded so the next run (with the right password) sends it.
    assert code == 2, err
    assert "535" in err and not (tmp_path / "jobs.results.jsonl").exists()
    assert "wrong-s3cret-value" not in out + err


async def test_metrics_textfile_and_live_scrape(server: FaultyServer, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(10)] + ["{bad"])
    config = write_config(tmp_path / "c.yaml", server, size=2)
    port = free_port()
    server.gate = asyncio.Event()
    run = asyncio.create_task(dispatcher(
        "run", str(jobs), "--config", str(config), "--metrics-port", str(port),
        "--metrics-textfile", str(tmp_path / "metrics.prom"), cwd=tmp_path))
    await server.wait_for(lambda: server.data_started >= 1, timeout=30)

    def scrape() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    live = await asyncio.to_thread(scrape)
    server.gate.set()
    code, _, err = await run
    assert code == 1, err  # one invalid line
    assert "smtp_pool_connections_open 2.0" in live
    assert 'dispatcher_jobs_total{status="invalid"} 1.0' in live
    text = (tmp_path / "metrics.prom").read_text()
    for expected in ('dispatcher_jobs_total{status="sent"} 10.0', 'dispatcher_jobs_total{status="invalid"} 1.0',
                     'smtp_pool_messages_total{outcome="sent"} 10.0', "smtp_pool_connects_total 2.0",
                     "smtp_pool_send_seconds_count 10.0", "smtp_pool_queue_depth 0.0", "smtp_pool_retries_total 0.0",
                     "smtp_pool_ambiguous_total 0.0", "smtp_pool_connect_errors_total 0.0"):
        assert expected in text, expected


async def test_jobs_from_standard_input(server: FaultyServer, tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yaml", server)
    stdin = "".join(json.dumps(job(i)) + "\n" for i in range(5)).encode()
    code, _, err = await dispatcher("run", "-", "--config", str(config), cwd=tmp_path, stdin=stdin)
    assert code == 2 and "--results" in err
    code, _, err = await dispatcher("run", "-", "--config", str(config), "--results", "out.jsonl",
                                    cwd=tmp_path, stdin=stdin)
    assert code == 0, err
    assert len(results(tmp_path / "out.jsonl")) == 5 == len(server.messages)


async def test_no_config_delivers_the_examples_to_the_outbox(tmp_path: Path) -> None:
    examples = ROOT / "examples" / "jobs.jsonl"
    (tmp_path / "jobs.jsonl").write_bytes(examples.read_bytes())
    code, _, err = await dispatcher("run", "jobs.jsonl", cwd=tmp_path)
    assert code == 0, err
    assert "capture server" in err and "outbox" in err
    count = sum(1 for line in examples.read_text().splitlines() if line.strip())
    assert len(list((tmp_path / "outbox" / "new").iterdir())) == count
    assert all(r["status"] == "sent" for r in results(tmp_path / "jobs.results.jsonl"))


async def test_sink_command_captures_into_a_maildir(tmp_path: Path) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *DISPATCHER, "sink", "--port", str(port), "--maildir", str(tmp_path / "box"), cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        while b"listening" not in await proc.stderr.readline():
            pass
        await aiosmtplib.send(b"Subject: hi\r\n\r\nbody\r\n", sender="a@example.org",
                              recipients=["b@example.net"], hostname="127.0.0.1", port=port)
        proc.send_signal(signal.SIGTERM)
        assert await proc.wait() == 0
    (captured,) = list((tmp_path / "box" / "new").iterdir())
    assert b"Subject: hi" in captured.read_bytes()


def test_id_set_is_a_set() -> None:
    import random

    ids, reference = IdSet(capacity=4), set()
    rng = random.Random(3)
    for _ in range(20000):
        value = str(rng.randrange(8000))
        assert ids.add(value) == (value not in reference)
        reference.add(value)
    assert len(ids) == len(reference)
    assert all(str(v) in ids for v in range(8000)) is False
    assert all(v in ids for v in reference)


def test_journal_ignores_a_torn_last_line_and_resumes(tmp_path: Path) -> None:
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": "a", "status": "sent"}\n{"id": "b", "status": "fai')
    journal = Journal(path)
    journal.open()
    journal.record({"id": "c", "status": "sent"})
    journal.close()
    assert "a" in journal.done and "b" not in journal.done
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[-1]) == {"id": "c", "status": "sent"}


@pytest.mark.parametrize("earlier", [b"", b'{"id": null, "line": 3, "status": "invalid"}\n',
                                     b'{"id": "a", "line": 1, "status": "sent"}\n{"id": "b", "line": 2, "status": "failed"}\n'
                                     b'{"id": null, "line": 3, "status": "invalid"}\n{"id": "z", "line": 4, "status": "sen'])
def test_done_earlier_names_exactly_the_ids_of_earlier_rows(tmp_path: Path, earlier: bytes) -> None:
    """What the compose process asks of every line (it answers at once for a new
    results file): true for an id an earlier run recorded, whatever its status;
    false for an id this run claims, a line number, a torn row."""
    path = tmp_path / "r.jsonl"
    path.write_bytes(earlier)
    journal = Journal(path)
    journal.open()
    try:
        journal.claim("new", 9)
        journal.record({"id": "new", "line": 9, "status": "sent"})
        expected = {"a", "b"} if b'"a"' in earlier else set()
        assert {i for i in ("a", "b", "z", "new", "3", "") if journal.done_earlier(i)} == expected
    finally:
        journal.close()


async def test_pool_from_config_uses_every_section(server: FaultyServer, tmp_path: Path) -> None:
    from dispatcher.config import load_settings
    from pool import SMTPPool

    config = write_config(tmp_path / "c.yaml", server, size=1, max_messages_per_connection=2)
    async with SMTPPool.from_config(load_settings(config)) as pool:
        assert pool.size == 1 and pool.max_messages_per_connection == 2 and pool.backoff_base == 0.001
        for i in range(4):
            await pool.submit(json.dumps(job(i)).encode(), sender="a@example.org", recipients=[f"r{i}@example.net"])
    assert [s.messages for s in server.sessions] == [2, 2]


def test_composed_job_round_trips_through_a_mail_parser() -> None:
    import email
    import email.policy

    from dispatcher.compose.jobs import Line, build, parse_job

    document = {"id": "ü1", "from": "Zoë <zoe@example.org>", "to": ["a@example.net"], "cc": ["c@example.net"],
                "bcc": ["hidden@example.net"], "subject": "Grüße", "text": "Hallo " * 400, "html": "<p>Hallo</p>",
                "headers": {"X-Campaign": "née"},
                "attachments": [{"filename": "résumé.txt", "content_base64": "aGk="}]}
    raw = json.dumps(document).encode()
    out = build(parse_job(Line(1, raw, len(raw))))
    assert isinstance(out.message, bytes) and out.message.isascii()
    assert max(len(line) for line in out.message.split(b"\n")) <= 998
    assert out.sender == "zoe@example.org"
    assert out.recipients == ["a@example.net", "c@example.net", "hidden@example.net"]
    parsed = email.message_from_bytes(out.message, policy=email.policy.default)
    assert (parsed["From"], parsed["Subject"], parsed["X-Campaign"]) == ("Zoë <zoe@example.org>", "Grüße", "née")
    assert "Bcc" not in parsed and b"hidden" not in out.message
    assert parsed.get_body(("plain",)).get_content().startswith("Hallo Hallo")
    assert parsed.get_body(("html",)).get_content().strip() == "<p>Hallo</p>"
    (attachment,) = parsed.iter_attachments()
    assert (attachment.get_filename(), attachment.get_content_type(), attachment.get_content()) == (
        "résumé.txt", "text/plain", "hi")
    assert parsed["Message-ID"] and parsed["Date"]


def test_long_recipient_lists_and_lines_stay_within_smtp_line_limits() -> None:
    from dispatcher.compose.jobs import JobError, Line, build, parse_job

    to = [f"recipient-number-{i}@example.net" for i in range(80)]
    raw = json.dumps({"id": "x", "from": "a@example.org", "to": to, "subject": "word " * 300,
                      "text": "word " * 1000 + "\n.leading dot\n"}).encode()
    out = build(parse_job(Line(1, raw, len(raw))))
    assert max(len(line) for line in out.message.split(b"\r\n")) <= 998
    assert out.recipients == to
    unfoldable = json.dumps({"id": "y", "from": "a@example.org", "to": to, "subject": "s" * 1200}).encode()
    with pytest.raises(JobError, match="subject: has a word of 900"):
        parse_job(Line(2, unfoldable, len(unfoldable)))


async def test_config_example_documents_only_keys_that_exist(tmp_path: Path) -> None:
    code, out, err = await dispatcher("check-config", str(ROOT / "config.example.yaml"), cwd=tmp_path,
                                      env={"SMTP_PASSWORD": "not-printed-anywhere"})
    assert code == 0, err
    assert "not-printed-anywhere" not in out + err


def test_tune_gc_freezes_start_up_and_collects_young_objects_less_often() -> None:
    """``dispatcher run`` calls it before the compose process forks (which inherits
    both settings); in a process of its own here, not to freeze pytest's objects."""
    script = ("import gc; from dispatcher.commands.common import tune_gc; before = gc.get_threshold(); tune_gc(); "
              "after = gc.get_threshold(); "
              "print(before[0], after[0], after[1:] == before[1:], gc.get_freeze_count() > 10000)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True)
    assert done.stdout.split() == ["700", "2000", "True", "True"]


def test_journal_digests_spread_over_the_bits_the_index_keeps() -> None:
    """The index homes a key by the top bits of its 64-bit digest: they must vary."""
    from dispatcher.batch.journal import _digest, id_key

    digests = [_digest(id_key(f"job-{i}")) for i in range(10_000)]
    assert len(set(digests)) == 10_000 and all(0 <= d < 1 << 64 for d in digests)
    assert len({d >> 60 for d in digests}) == 16
