"""The loop against a real Postfix (tests/postfixserver.py): campaign 1 is relayed to
unknown local users, a mailbox, an address refused at RCPT and one that auto-replies;
Postfix's own DSNs and the auto-reply land in the bounce Maildir; ``dispatcher bounces``
suppresses exactly the unknown users; campaign 2 leaves out exactly the suppressed."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_dispatcher import dispatcher, results, write_jobs

pytestmark = pytest.mark.timeout(120)

LIST = ["good@example.com", "nouser1@test.example", "nouser2@test.example", "vacation@example.com",
        "unknown@example.com"]


def campaign(name: str) -> list[dict[str, object]]:
    return [{"id": f"{name}-{i}", "from": "news@example.org", "to": [address], "subject": f"{name} news",
             "text": "Hello.\n"} for i, address in enumerate(LIST)]


async def test_postfix_dsns_suppress_exactly_the_unknown_users(tmp_path: Path) -> None:
    from postfixserver import start_postfix

    postfix = await asyncio.to_thread(start_postfix)
    try:
        config = tmp_path / "c.yaml"
        config.write_text(f"smtp:\n  hostname: 127.0.0.1\n  port: {postfix.port}\n  timeout: 10\n"
                          "jobs:\n  return_path: bounces+{{ id }}@example.org\n"
                          f"suppression:\n  path: {tmp_path / 'list.sqlite'}\n")
        jobs1 = write_jobs(tmp_path / "c1.jsonl", campaign("c1"))
        code, _, err = await dispatcher("run", str(jobs1), "--config", str(config), cwd=tmp_path)
        assert code == 1, err  # unknown@example.com is refused at RCPT
        rows = {r["id"]: r for r in results(tmp_path / "c1.results.jsonl")}
        assert [rows[f"c1-{i}"]["status"] for i in range(5)] == ["sent", "sent", "sent", "sent", "failed"]
        assert rows["c1-4"]["code"] == 550 and "5.1.1" in rows["c1-4"]["response"]

        # Two DSNs (the unknown local users) and one auto-reply come back to the VERP addresses.
        await asyncio.to_thread(postfix.wait_for, "bounces", 3)
        await asyncio.to_thread(postfix.wait_for, "good", 1)
        code, out, err = await dispatcher("bounces", str(postfix.bounce_maildir), "--config", str(config),
                                          cwd=tmp_path)
        assert code == 0, err
        reports = sorted((r["type"], r["recipient"], r["job_id"], r["action"]) for r in map(json.loads,
                                                                                             out.splitlines()))
        assert reports == [
            ("auto_reply", "vacation@example.com", "c1-3", "ignored"),
            ("bounce", "nouser1@test.example", "c1-1", "suppressed"),
            ("bounce", "nouser2@test.example", "c1-2", "suppressed"),
        ], postfix.log()[-3000:]

        code, out, _ = await dispatcher("suppress", "list", "--config", str(config), cwd=tmp_path)
        listed = {r["address"]: r["reason"] for r in map(json.loads, out.splitlines())}
        assert listed == {"unknown@example.com": "hard_bounce", "nouser1@test.example": "hard_bounce",
                          "nouser2@test.example": "hard_bounce"}

        jobs2 = write_jobs(tmp_path / "c2.jsonl", campaign("c2"))
        code, _, err = await dispatcher("run", str(jobs2), "--config", str(config), cwd=tmp_path)
        assert code == 0, err
        rows2 = results(tmp_path / "c2.results.jsonl")
        assert sorted(a for r in rows2 if r["status"] == "suppressed" for a in r["suppressed"]) == sorted(listed)
        assert sorted(r["id"] for r in rows2 if r["status"] == "sent") == ["c2-0", "c2-3"]
    finally:
        await asyncio.to_thread(postfix.stop)


async def test_dsn_parameters_name_the_job_and_recipient_without_verp(tmp_path: Path) -> None:
    """SMTPPool offers RET/ENVID/NOTIFY/ORCPT to a relay that offers DSN; Postfix's bounce
    carries them back, and bounces matches the job by ENVID alone (no return_path)."""
    import email
    import email.policy

    from postfixserver import start_postfix

    from pool import SMTPPool

    postfix = await asyncio.to_thread(start_postfix)
    try:
        for pipelining in (True, False):  # both ways of writing the commands
            async with SMTPPool(hostname="127.0.0.1", port=postfix.port, size=1, pipelining=pipelining) as pool:
                await pool.submit(b"From: news@example.org\r\nSubject: dsn\r\n\r\nHi\r\n",
                                  sender="bounces@example.org",
                                  recipients=[f"no+body{int(pipelining)}@test.example", "good@example.com"],
                                  envelope_id=f"job {int(pipelining)}+x=")
        await asyncio.to_thread(postfix.wait_for, "bounces", 2)
        dsns = [email.message_from_bytes(p.read_bytes(), policy=email.policy.compat32)
                for p in sorted((postfix.bounce_maildir / "new").iterdir())]
        status_parts = [next(part for part in m.walk() if part.get_content_type() == "message/delivery-status")
                        for m in dsns]
        blocks = [part.get_payload() for part in status_parts]
        envids = sorted(str(b[0]["Original-Envelope-Id"]) for b in blocks)
        assert envids == ["job 0+x=", "job 1+x="]  # sent as xtext (job+200+2Bx+3D), written back decoded
        assert sorted(str(b[1]["Original-Recipient"]) for b in blocks) == [
            "rfc822;no+body0@test.example", "rfc822;no+body1@test.example"]  # ORCPT, sent as no+2Bbody0@...
        assert all(len(b) == 2 for b in blocks)  # good@ was delivered: not reported
        # RET=HDRS: the headers come back, not the message (Postfix returns it whole by default).
        assert all(any(p.get_content_type() == "text/rfc822-headers" for p in m.walk()) for m in dsns)
        assert not any(p.get_content_type() == "message/rfc822" for m in dsns for p in m.walk())
        code, out, err = await dispatcher("bounces", str(postfix.bounce_maildir), "--dry-run", cwd=tmp_path)
        assert code == 0, err
        assert sorted((r["job_id"], r["recipient"], r["status"]) for r in map(json.loads, out.splitlines())) == [
            ("job 0+x=", "no+body0@test.example", "5.1.1"), ("job 1+x=", "no+body1@test.example", "5.1.1")]
    finally:
        await asyncio.to_thread(postfix.stop)
