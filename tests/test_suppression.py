"""The suppression list: the store, ``dispatcher suppress``, and ``run`` leaving listed
recipients out (and adding hard bounces itself), against a real SMTP server."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
from pathlib import Path

import pytest
from smtpserver import FaultyServer
from test_dispatcher import dispatcher, job, results, write_config, write_jobs

from dispatcher.loop.suppression import (
    Admission,
    Reason,
    Record,
    SuppressionStore,
    enhanced_status,
    is_hard_bounce,
)

pytestmark = pytest.mark.timeout(60)


def _rows(store: Path) -> dict[str, Record]:
    s = SuppressionStore(store)
    try:
        return {r.address.lower(): r for r in s.records()}
    finally:
        s.close()


async def test_listed_recipients_are_left_out_and_named_in_the_row(tmp_path: Path, server: FaultyServer) -> None:
    code, _, err = await dispatcher("suppress", "add", "Gone@Example.NET", "left@example.net", "--reason",
                                    "unsubscribe", cwd=tmp_path)
    assert code == 0, err
    config = write_config(tmp_path / "c.yaml", server)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [
        job(1, to=["stays@example.net", "gone@example.net"]),  # case differs from the list: still suppressed
        job(2, to=["left@example.net"]),
        job(3),
    ])
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 0, err  # a suppressed job is not a failure
    rows = {r["id"]: r for r in results(tmp_path / "jobs.results.jsonl")}
    assert rows["job-1"]["status"] == "sent" and rows["job-1"]["suppressed"] == ["gone@example.net"]
    assert rows["job-2"]["status"] == "suppressed" and rows["job-2"]["suppressed"] == ["left@example.net"]
    assert rows["job-2"]["attempts"] == 0
    assert rows["job-3"]["status"] == "sent" and rows["job-3"]["suppressed"] == []
    sent_to = sorted(r for m in server.messages for r in m.rcpt_tos)
    assert sent_to == ["rcpt3@example.net", "stays@example.net"]
    # Resume: a suppressed row is done, and a run that only skips is a success.
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert len(server.messages) == 2
    assert len(results(tmp_path / "jobs.results.jsonl")) == 3


async def test_suppressed_recipients_are_counted_by_reason_in_the_metrics(tmp_path: Path,
                                                                          server: FaultyServer) -> None:
    store = SuppressionStore(tmp_path / "suppressions.sqlite")
    store.add([Record("a@example.net", Reason.COMPLAINT, "test"), Record("b@example.net", Reason.HARD_BOUNCE, "t")])
    store.close()
    config = write_config(tmp_path / "c.yaml", server)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1, to=["a@example.net"]), job(2, to=["b@example.net", "c@x.org"])])
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--metrics-textfile",
                                    str(tmp_path / "m.prom"), cwd=tmp_path)
    assert code == 0, err
    text = (tmp_path / "m.prom").read_text()
    assert 'dispatcher_suppressed_total{reason="complaint"} 1.0' in text
    assert 'dispatcher_suppressed_total{reason="hard_bounce"} 1.0' in text
    assert 'dispatcher_jobs_total{status="suppressed"} 1.0' in text


async def test_a_hard_refusal_suppresses_and_a_soft_or_policy_one_never(tmp_path: Path, server: FaultyServer) -> None:
    server.faults.rcpt.update({
        "nouser@example.net": "550 5.1.1 <nouser@example.net>: Recipient address rejected: User unknown",
        "disabled@example.net": "550 5.2.1 Mailbox disabled",
        "full@example.net": "552 5.2.2 Mailbox full",
        "policy@example.net": "550 5.7.1 Message rejected as spam",
        "nostatus@example.net": "550 No such user here",
        "later@example.net": "450 4.1.1 Try again later",
    })
    config = write_config(tmp_path / "c.yaml", server)
    config.write_text(config.read_text().replace("retry:\n", "retry:\n  max_attempts: 2\n"))
    everyone = ["ok@example.net", *server.faults.rcpt]
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1, to=everyone)])
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    listed = _rows(tmp_path / "suppressions.sqlite")
    assert sorted(listed) == ["disabled@example.net", "nouser@example.net"]
    record = listed["nouser@example.net"]
    assert record.reason is Reason.HARD_BOUNCE and record.job_id == "job-1" and record.source == "run"
    assert record.detail is not None and record.detail.startswith("550 5.1.1 <nouser@example.net>")
    # The next campaign leaves them out.
    jobs2 = write_jobs(tmp_path / "jobs2.jsonl", [job(2, to=["nouser@example.net"]),
                                                   job(3, to=["full@example.net", "disabled@example.net"])])
    code, _, err = await dispatcher("run", str(jobs2), "--config", str(config), cwd=tmp_path)
    assert code == 1, err  # full@ is refused again: a failure, but not suppressed
    rows = {r["id"]: r for r in results(tmp_path / "jobs2.results.jsonl")}
    assert rows["job-2"]["status"] == "suppressed"
    assert rows["job-3"]["suppressed"] == ["disabled@example.net"]


async def test_auto_false_never_suppresses(tmp_path: Path, server: FaultyServer) -> None:
    server.faults.rcpt["nouser@example.net"] = "550 5.1.1 User unknown"
    config = write_config(tmp_path / "c.yaml", server)
    config.write_text(config.read_text() + "suppression:\n  auto: false\n")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1, to=["nouser@example.net", "ok@example.net"])])
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert not (tmp_path / "suppressions.sqlite").exists()


@pytest.mark.parametrize(("text", "status", "hard"), [
    ("5.1.1 User unknown", "5.1.1", True),
    ("5.1.10 Recipient address rejected: Access denied", "5.1.10", True),
    ("5.2.1 Mailbox disabled", "5.2.1", True),
    ("5.2.2 Mailbox full", "5.2.2", False),
    ("5.7.1 Rejected by policy", "5.7.1", False),
    ("4.1.1 Try later", "4.1.1", False),
    ("User unknown", None, False),
    ("", None, False),
])
def test_only_5_1_x_and_5_2_1_are_hard_bounces(text: str, status: str | None, hard: bool) -> None:
    assert enhanced_status(text) == status
    assert is_hard_bounce(status) is hard


def _add_many(path: str, prefix: str, n: int) -> None:
    store = SuppressionStore(Path(path))
    for i in range(n):  # one transaction each: the writers interleave
        store.add([Record(f"{prefix}{i}@example.net", Reason.MANUAL, prefix)])
    store.close()


def test_several_processes_write_the_store_at_once(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sqlite")
    SuppressionStore(Path(path)).add([])  # created, in WAL mode
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_add_many, args=(path, f"p{k}-", 200)) for k in range(3)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(30)
        assert w.exitcode == 0
    assert len(_rows(Path(path))) == 600


async def test_a_run_sees_what_another_process_adds_while_it_runs(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    SuppressionStore(path).add([Record("early@example.net", Reason.MANUAL, "t")])
    admission = Admission(SuppressionStore(path), refresh=0.02)
    admission.load()
    assert admission.admit(["early@example.net", "late@example.net"]) == (["late@example.net"], ["early@example.net"])
    watch = asyncio.create_task(admission.watch())
    try:
        other = SuppressionStore(path)
        other.add([Record("LATE@example.net", Reason.UNSUBSCRIBE, "server")])
        other.close()
        async with asyncio.timeout(5):
            while admission.admit(["late@example.net"])[1] == []:
                await asyncio.sleep(0.01)
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def test_suppress_command_adds_lists_removes_imports_and_exports(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(f"suppression:\n  path: {tmp_path / 'list.sqlite'}\n")
    c = ["--config", str(config)]
    code, _, err = await dispatcher("suppress", "add", "a@example.net", "--detail", "asked by phone", *c,
                                    cwd=tmp_path)
    assert code == 0, err
    code, _, err = await dispatcher("suppress", "add", "A@EXAMPLE.NET", "not an address", *c, cwd=tmp_path)
    assert code == 2 and "not an address" in err
    (tmp_path / "in.csv").write_text("address,reason,at\nb@example.net,complaint,2026-01-02T03:04:05Z\n"
                                     "c@example.net,,\n")
    code, _, err = await dispatcher("suppress", "import", "in.csv", *c, cwd=tmp_path)
    assert code == 0 and "imported 2" in err, err
    (tmp_path / "in.jsonl").write_text('{"address": "d@example.net", "reason": "hard_bounce", "job_id": "j9"}\n'
                                       '{"address": "e@example.net", "reason": "bogus"}\n')
    code, _, err = await dispatcher("suppress", "import", "in.jsonl", *c, cwd=tmp_path)
    assert code == 2 and "in.jsonl line 2" in err and "reason" in err
    code, out, err = await dispatcher("suppress", "list", *c, cwd=tmp_path)
    assert code == 0, err
    listed = [json.loads(line) for line in out.splitlines()]
    assert [r["address"] for r in listed] == ["b@example.net", "a@example.net", "c@example.net"] or \
        sorted(r["address"] for r in listed) == ["a@example.net", "b@example.net", "c@example.net"]
    by = {r["address"]: r for r in listed}
    assert by["a@example.net"]["detail"] == "asked by phone" and by["a@example.net"]["reason"] == "manual"
    assert by["b@example.net"]["reason"] == "complaint" and by["b@example.net"]["at"] == "2026-01-02T03:04:05Z"
    code, out, _ = await dispatcher("suppress", "list", "--reason", "complaint", *c, cwd=tmp_path)
    assert [json.loads(line)["address"] for line in out.splitlines()] == ["b@example.net"]
    code, out, _ = await dispatcher("suppress", "export", *c, cwd=tmp_path)
    lines = out.splitlines()
    assert lines[0] == "address,reason,at" and "b@example.net,complaint,2026-01-02T03:04:05Z" in lines
    assert len(lines) == 4
    code, _, err = await dispatcher("suppress", "remove", "B@example.net", "zz@example.net", *c, cwd=tmp_path)
    assert code == 0 and "removed 1" in err
    # The export imports back into another store.
    (tmp_path / "out.csv").write_text(out)
    other = tmp_path / "o.yaml"
    other.write_text(f"suppression:\n  path: {tmp_path / 'other.sqlite'}\n")
    code, _, err = await dispatcher("suppress", "import", "out.csv", "--config", str(other), cwd=tmp_path)
    assert code == 0 and "imported 3" in err, err
