"""The loop end to end, every step a real command: campaign 1 (one address refused at
send time) -> a bounce arriving later in the bounce Maildir -> a one-click unsubscribe
on the unsubscribe server -> campaign 2 to the same list leaves out exactly those three."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import os
from pathlib import Path

import pytest
from smtpserver import FaultyServer
from test_dispatcher import DISPATCHER, ROOT, dispatcher, results, write_config, write_jobs
from test_unsubscribe_server import http

pytestmark = pytest.mark.timeout(90)

LIST = ["ok1@example.net", "ok2@example.net", "refused@example.net", "bounces.later@example.net",
        "unsubscribes@example.net", "ok3@example.net"]


def campaign(name: str) -> list[dict[str, object]]:
    return [{"id": f"{name}-{i}", "from": "news@example.org", "to": [address], "subject": f"{name} news",
             "text": "Hello.\n"} for i, address in enumerate(LIST)]


def postfix_dsn(job_id: str, recipient: str, message_id: str) -> bytes:
    """A delayed bounce as Postfix writes it (see tests/bounces/postfix-user-unknown.eml)."""
    template = (Path(__file__).parent / "bounces" / "postfix-user-unknown.eml").read_text()
    return (template.replace("job-1001.a1b2c3@example.org", message_id.strip("<>"))
            .replace("job-1001", job_id).replace("nobody@example.net", recipient)).encode()


async def test_bounces_and_unsubscribes_keep_the_next_campaign_away(tmp_path: Path, server: FaultyServer) -> None:
    server.faults.rcpt["refused@example.net"] = "550 5.1.1 <refused@example.net>: User unknown"
    secret = "loop-secret-0123456789"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "UNSUBSCRIBE_SECRET": secret}
    base = tmp_path / "base.yaml"
    base.write_text("unsubscribe:\n  secret: ${UNSUBSCRIBE_SECRET}\n")
    unsubscribe = await asyncio.create_subprocess_exec(*DISPATCHER, "unsubscribe-server", "--config", str(base),
                                                       "--port", "0", cwd=tmp_path, env=env,
                                                       stderr=asyncio.subprocess.PIPE)
    try:
        assert unsubscribe.stderr is not None
        async with asyncio.timeout(30):
            line = (await unsubscribe.stderr.readline()).decode()
        server_url = line.split("listening on ")[1].split()[0].rstrip("/")
        config = write_config(tmp_path / "c.yaml", server)
        config.write_text(config.read_text() + "jobs:\n  return_path: bounces+{{ id }}@example.org\n"
                          f"unsubscribe:\n  url: \"{server_url}/u/{{{{ token }}}}\"\n"
                          "  secret: ${UNSUBSCRIBE_SECRET}\n")

        # Campaign 1: five accepted, one refused at RCPT with 5.1.1 (suppressed at once).
        jobs1 = write_jobs(tmp_path / "campaign1.jsonl", campaign("c1"))
        code, _, err = await dispatcher("run", str(jobs1), "--config", str(config), cwd=tmp_path, env=env)
        assert code == 1, err  # the refused job failed
        rows1 = {r["id"]: r for r in results(tmp_path / "campaign1.results.jsonl")}
        assert sorted(r["status"] for r in rows1.values()) == ["failed"] + ["sent"] * 5
        sent = {m.rcpt_tos[0]: email.message_from_bytes(m.content, policy=email.policy.default) for m in server.messages}
        assert {m.mail_from for m in server.messages} == {f"bounces+c1-{i}@example.org" for i in (0, 1, 3, 4, 5)}

        # Days later: bounces.later@ bounces; the DSN lands in the bounce Maildir.
        maildir = tmp_path / "bounce-mail"
        for sub in ("new", "cur", "tmp"):
            (maildir / sub).mkdir(parents=True)
        late = sent["bounces.later@example.net"]
        (maildir / "new" / "1.dsn").write_bytes(postfix_dsn("c1-3", "bounces.later@example.net", late["Message-ID"]))
        code, out, err = await dispatcher("bounces", str(maildir), "--config", str(config), cwd=tmp_path, env=env)
        assert code == 0, err
        [report] = [json.loads(x) for x in out.splitlines()]
        assert (report["type"], report["recipient"], report["job_id"], report["action"]) == (
            "bounce", "bounces.later@example.net", "c1-3", "suppressed")

        # unsubscribes@ presses one-click in their mail client: the POST of RFC 8058.
        target = sent["unsubscribes@example.net"]
        assert target["List-Unsubscribe-Post"] is None or target["List-Unsubscribe-Post"] == \
            "List-Unsubscribe=One-Click"
        url = str(target["List-Unsubscribe"]).strip("<>")
        status, _, _ = await http("POST", url, b"List-Unsubscribe=One-Click", "application/x-www-form-urlencoded")
        assert status == 200

        code, out, _ = await dispatcher("suppress", "list", "--config", str(config), cwd=tmp_path, env=env)
        listed = {r["address"]: r for r in map(json.loads, out.splitlines())}
        assert {a: (r["reason"], r["job_id"]) for a, r in listed.items()} == {
            "refused@example.net": ("hard_bounce", "c1-2"),
            "bounces.later@example.net": ("hard_bounce", "c1-3"),
            "unsubscribes@example.net": ("unsubscribe", "c1-4"),
        }

        # Campaign 2 to the same list: exactly those three are left out.
        before = len(server.messages)
        jobs2 = write_jobs(tmp_path / "campaign2.jsonl", campaign("c2"))
        code, _, err = await dispatcher("run", str(jobs2), "--config", str(config), cwd=tmp_path, env=env)
        assert code == 0, err
        rows2 = {r["id"]: r for r in results(tmp_path / "campaign2.results.jsonl")}
        suppressed = sorted(a for r in rows2.values() if r["status"] == "suppressed" for a in r["suppressed"])
        assert suppressed == sorted(listed)
        assert sorted(m.rcpt_tos[0] for m in server.messages[before:]) == sorted(set(LIST) - set(listed))
    finally:
        unsubscribe.terminate()
        async with asyncio.timeout(15):
            await unsubscribe.wait()
