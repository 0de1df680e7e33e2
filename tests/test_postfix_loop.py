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
