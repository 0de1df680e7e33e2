"""Suppression edges a review found: a refused sender, a Unicode domain, --retry-failed."""
from __future__ import annotations

from pathlib import Path

from smtpserver import FaultyServer
from test_dispatcher import dispatcher, job, results, write_config, write_jobs
from test_suppression import _rows


async def test_a_sender_refused_with_5_1_x_suppresses_no_recipient(tmp_path: Path, server: FaultyServer) -> None:
    server.faults.mail_code = "550 5.1.8 Access denied, bad outbound sender"
    config = write_config(tmp_path / "c.yaml", server)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1, to=["a@example.net", "b@example.net"]),
                                                job(2, to=["c@example.net"])])
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 1, err
    listed = _rows(tmp_path / "suppressions.sqlite") if (tmp_path / "suppressions.sqlite").exists() else {}
    assert listed == {}, f"suppressed as hard bounces because the SENDER was refused: {sorted(listed)}"


async def test_an_idn_address_suppressed_as_typed_is_left_out(tmp_path: Path, server: FaultyServer) -> None:
    code, _, err = await dispatcher("suppress", "add", "ada@bücher.example", cwd=tmp_path)
    assert code == 0, err
    config = write_config(tmp_path / "c.yaml", server)
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1, to=["ada@bücher.example"])])
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert results(tmp_path / "jobs.results.jsonl")[-1]["status"] == "suppressed"
    sent_to = [r for m in server.messages for r in m.rcpt_tos]
    assert sent_to == [], f"suppressed address was sent to: {sent_to}"


async def test_retry_failed_all_suppressed_row_keeps_the_earlier_delivery(tmp_path: Path, server: FaultyServer) -> None:
    server.faults.rcpt_defer["later@example.net"] = 99
    config = write_config(tmp_path / "c.yaml", server)
    config.write_text(config.read_text().replace("retry:\n", "retry:\n  max_attempts: 1\n"))
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1, to=["ok@example.net", "later@example.net"])])
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    rows = results(tmp_path / "jobs.results.jsonl")
    assert rows[-1]["status"] == "sent" and "later@example.net" in rows[-1]["refused"], rows
    code, _, err = await dispatcher("suppress", "add", "later@example.net", cwd=tmp_path)
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--retry-failed", cwd=tmp_path)
    rows = results(tmp_path / "jobs.results.jsonl")
    assert code == 0, err
    assert rows[-1]["status"] == "suppressed" and rows[-1].get("recipients") == ["later@example.net"], (
        f"the last row for job-1 must speak for the retried recipient only: {rows[-1]}")
    assert [r for m in server.messages for r in m.rcpt_tos].count("ok@example.net") == 1


async def test_identical_refusals_suppress_only_when_another_recipient_accepted(tmp_path: Path) -> None:
    from dispatcher.loop.suppression import Admission, SuppressionStore

    store = SuppressionStore(tmp_path / "s.sqlite")
    admission = Admission(store)
    same = (550, "5.1.1 The email account that you tried to reach does not exist")
    refused = {"a@example.net": same, "b@example.net": same}
    assert await admission.refused("job-1", refused) == []  # MAIL or DATA refused: the message, not them
    added = await admission.refused("job-2", refused, delivered=True)  # their own RCPT replies
    assert sorted(r.address for r in added) == ["a@example.net", "b@example.net"]
    assert await admission.refused("job-3", {"c@example.net": (550, "5.1.8 bad sender")}) == []
    store.close()
