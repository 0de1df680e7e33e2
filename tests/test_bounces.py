"""``dispatcher bounces``: the sample corpus (tests/bounces/) classified as expected, and
Maildir / mbox sources: suppress, mark seen, leave the unknown alone, --dry-run."""

from __future__ import annotations

import json
import mailbox
import shutil
from pathlib import Path

import pytest
from test_dispatcher import dispatcher

from dispatcher.loop.bounces import classify, xtext_decode
from dispatcher.loop.suppression import Reason, SuppressionStore
from dispatcher.loop.verp import ReturnPath, decode, encode
from pool.envelope import xtext

pytestmark = pytest.mark.timeout(60)

CORPUS = Path(__file__).parent / "bounces"
EXPECTED: dict[str, list[list[str | None]]] = json.loads((CORPUS / "expected.json").read_text())
VERP = ReturnPath("bounces+{{ id }}@example.org")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_is_classified_as_expected(name: str) -> None:
    reports = classify((CORPUS / name).read_bytes(), VERP)
    got = [[r.type.value, r.recipient, r.status, r.action, r.job_id] for r in reports]
    assert got == EXPECTED[name]


def test_every_sample_has_an_expectation() -> None:
    assert sorted(p.name for p in CORPUS.glob("*.eml")) == sorted(EXPECTED)


def test_the_returned_message_id_is_reported() -> None:
    [report] = classify((CORPUS / "postfix-user-unknown.eml").read_bytes(), VERP)
    assert report.message_id == "<job-1001.a1b2c3@example.org>"
    assert report.diagnostic is not None and "User unknown" in report.diagnostic


def test_envid_names_the_job_without_verp() -> None:
    [report] = classify((CORPUS / "postfix-user-unknown.eml").read_bytes(), None)
    assert report.job_id == "job-1001"


@pytest.mark.parametrize("job_id", ["a7", "job 1#x", "Ünïcode/é=+", "a.b..c"])
def test_verp_and_xtext_read_back_exactly(job_id: str) -> None:
    address = VERP.render(job_id)
    assert address.startswith("bounces+") and address.endswith("@example.org")
    assert all(c.isalnum() or c in "+-_=@." for c in address) and address.isascii()
    assert VERP.job_id(address) == job_id
    assert VERP.job_id(address.replace("bounces", "Bounces").replace("example.org", "EXAMPLE.org")) == job_id
    assert decode(encode(job_id)) == job_id
    assert xtext_decode(xtext(job_id)) == job_id


def test_return_path_template_is_checked() -> None:
    for bad in ("bounces@example.org", "{{ id }}{{ id }}@example.org", "bounces@{{ id }}.example.org",
                "b+{{ id }}@localhost"):
        with pytest.raises(ValueError, match=r"jobs\.return_path"):
            ReturnPath(bad)
    assert VERP.job_id("someone@example.org") is None
    assert VERP.job_id("bounces+@example.org") is None


def _maildir(root: Path, names: list[str]) -> Path:
    box = root / "bounces"
    for sub in ("new", "cur", "tmp"):
        (box / sub).mkdir(parents=True)
    for i, name in enumerate(names):
        shutil.copy(CORPUS / name, box / "new" / f"1701600000.M{i}P1.mx.example.org")
    return box


def _config(tmp_path: Path) -> Path:
    config = tmp_path / "c.yaml"
    config.write_text("jobs:\n  return_path: bounces+{{ id }}@example.org\n"
                      f"suppression:\n  path: {tmp_path / 'list.sqlite'}\n")
    return config


async def test_maildir_suppresses_marks_seen_and_leaves_the_unknown_alone(tmp_path: Path) -> None:
    box = _maildir(tmp_path, sorted(EXPECTED))
    unknown = next(p for p in (box / "new").iterdir() if p.read_bytes() == (CORPUS / "human-reply.eml").read_bytes())
    before = {p.name: p.read_bytes() for p in (box / "new").iterdir()}
    config = _config(tmp_path)

    code, out, err = await dispatcher("bounces", str(box), "--config", str(config), "--dry-run", cwd=tmp_path)
    assert code == 0, err
    assert len(out.splitlines()) == sum(len(v) for v in EXPECTED.values())
    assert {p.name: p.read_bytes() for p in (box / "new").iterdir()} == before  # --dry-run changes nothing
    assert not (tmp_path / "list.sqlite").exists()

    code, out, err = await dispatcher("bounces", str(box), "--config", str(config), "--metrics-textfile",
                                      str(tmp_path / "m.prom"), cwd=tmp_path)
    assert code == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert {r["type"] for r in rows} == {"bounce", "delay", "complaint", "auto_reply", "unknown"}
    assert all(r["source"].startswith(f"maildir:{box}#new/") for r in rows)
    listed = {r.address.lower(): r for r in SuppressionStore(tmp_path / "list.sqlite").records()}
    wanted = {str(e[1]).lower() for v in EXPECTED.values() for e in v if e[3] == "suppressed"}
    assert set(listed) == wanted
    assert listed["nobody@example.net"].reason is Reason.HARD_BOUNCE
    assert listed["nobody@example.net"].job_id == "job-1001"
    assert listed["reader@example.com"].reason is Reason.COMPLAINT
    # Classified: moved to cur/ with the S flag, bytes unchanged. Unknown: untouched in new/.
    assert [p.name for p in (box / "new").iterdir()] == [unknown.name]
    seen = list((box / "cur").iterdir())
    assert len(seen) == len(EXPECTED) - 1 and all(p.name.endswith(":2,S") for p in seen)
    assert sorted(p.read_bytes() for p in seen) == sorted(b for n, b in before.items() if n != unknown.name)
    prom = (tmp_path / "m.prom").read_text()
    assert 'dispatcher_bounces_total{type="bounce"} 10.0' in prom
    assert 'dispatcher_bounces_total{type="complaint"} 2.0' in prom

    # A second pass reads only what it did not classify.
    code, out, err = await dispatcher("bounces", str(box), "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["unknown"]


async def test_mbox_marks_read_and_keeps_the_unknown_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "bounces.mbox"
    box = mailbox.mbox(path)
    for name in ("gmail-no-such-user.eml", "human-reply.eml", "vacation-auto-reply.eml"):
        box.add((CORPUS / name).read_bytes())
    box.flush()
    box.close()
    human = (CORPUS / "human-reply.eml").read_bytes().replace(b"\r\n", b"\n")
    config = _config(tmp_path)
    code, out, err = await dispatcher("bounces", str(path), "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["bounce", "unknown", "auto_reply"]
    box = mailbox.mbox(path)
    flags = [m.get_flags() for m in box]
    assert flags == ["RO", "", "RO"]
    assert box.get_bytes(1).replace(b"\r\n", b"\n").rstrip(b"\n") == human.rstrip(b"\n")
    box.close()
    code, out, err = await dispatcher("bounces", str(path), "--config", str(config), cwd=tmp_path)
    assert [json.loads(line)["type"] for line in out.splitlines()] == ["unknown"]
    assert set(SuppressionStore(tmp_path / "list.sqlite").reasons()) == {"doesnotexist.42@gmail.example"}


async def test_a_missing_source_is_one_line_and_exit_2(tmp_path: Path) -> None:
    code, _, err = await dispatcher("bounces", str(tmp_path / "nope"), cwd=tmp_path)
    assert code == 2 and "no such Maildir, mbox file or imaps:// URL" in err and "Traceback" not in err
    code, _, err = await dispatcher("bounces", "imaps://u@127.0.0.1:1/INBOX", cwd=tmp_path)
    assert code == 2 and "bounces.imap_password is not set" in err


async def test_run_sends_each_job_from_its_verp_return_path(tmp_path: Path) -> None:
    from smtpserver import FaultyServer
    from test_dispatcher import job, results, write_config, write_jobs

    async with FaultyServer() as server:
        config = write_config(tmp_path / "c.yaml", server)
        config.write_text(config.read_text() + "jobs:\n  return_path: bounces+{{ id }}@example.org\n")
        jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1), job(2, id="a b"), {"id": "raw-1", "mail_from": "raw@example.org",
                          "rcpt_to": ["r@example.net"], "raw": "From: raw@example.org\r\nSubject: x\r\n\r\nHi\r\n"}])
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
        assert code == 0, err
        senders = sorted(m.mail_from for m in server.messages)
    assert senders == ["bounces+a=20b@example.org", "bounces+job-1@example.org", "raw@example.org"]
    assert VERP.job_id("bounces+a=20b@example.org") == "a b"
    assert all(r["status"] == "sent" for r in results(tmp_path / "jobs.results.jsonl"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("jobs:\n  return_path: bounces@example.org\n")
    code, _, err = await dispatcher("check-config", str(bad), cwd=tmp_path)
    assert code == 2 and "jobs.return_path: must hold {{ id }} once" in err, err


async def test_imap_source_against_a_real_dovecot(tmp_path: Path) -> None:
    import asyncio
    import imaplib
    import ssl

    from dovecotserver import start_dovecot

    server = await asyncio.to_thread(start_dovecot)
    try:
        context = ssl.create_default_context(cafile=str(server.ca_file))

        def deliver() -> None:
            imap = imaplib.IMAP4_SSL("127.0.0.1", server.port, ssl_context=context, timeout=10)
            imap.login(server.user, server.password)
            for name in ("postfix-user-unknown.eml", "human-reply.eml", "ses-complaint.eml"):
                imap.append("INBOX", None, None, (CORPUS / name).read_bytes().replace(b"\n", b"\r\n"))
            imap.logout()

        def flags() -> list[str]:
            imap = imaplib.IMAP4_SSL("127.0.0.1", server.port, ssl_context=context, timeout=10)
            imap.login(server.user, server.password)
            imap.select("INBOX", readonly=True)
            _, data = imap.uid("FETCH", "1:*", "(FLAGS)")
            imap.logout()
            return ["\\Seen" in entry.decode() for entry in data if isinstance(entry, bytes)]

        await asyncio.to_thread(deliver)
        config = tmp_path / "c.yaml"
        config.write_text("jobs:\n  return_path: bounces+{{ id }}@example.org\n"
                          f"suppression:\n  path: {tmp_path / 'list.sqlite'}\n"
                          f"bounces:\n  imap_password: ${{IMAP_PASSWORD}}\n  ca_file: {server.ca_file}\n")
        env = {"IMAP_PASSWORD": server.password}
        code, out, err = await dispatcher("bounces", server.url, "--config", str(config), "--dry-run",
                                          cwd=tmp_path, env=env)
        assert code == 0, err + server.log()
        assert [json.loads(line)["type"] for line in out.splitlines()] == ["bounce", "unknown", "complaint"]
        assert await asyncio.to_thread(flags) == [False, False, False]  # --dry-run: nothing marked

        code, out, err = await dispatcher("bounces", server.url, "--config", str(config), cwd=tmp_path, env=env)
        assert code == 0, err
        assert server.password not in out + err
        rows = [json.loads(line) for line in out.splitlines()]
        assert rows[0]["source"] == f"{server.url}#1" and rows[0]["job_id"] == "job-1001"
        assert await asyncio.to_thread(flags) == [True, False, True]  # the unknown one stays unseen
        assert set(SuppressionStore(tmp_path / "list.sqlite").reasons()) == {"nobody@example.net",
                                                                          "reader@example.com"}
        code, out, err = await dispatcher("bounces", server.url, "--config", str(config), cwd=tmp_path, env=env)
        assert [json.loads(line)["type"] for line in out.splitlines()] == ["unknown"]

        wrong = {"IMAP_PASSWORD": "wrong-password"}
        code, out, err = await dispatcher("bounces", server.url, "--config", str(config), cwd=tmp_path, env=wrong)
        assert code == 2 and "Traceback" not in err and "wrong-password" not in err
    finally:
        await asyncio.to_thread(server.stop)


async def test_a_report_without_verp_or_envid_is_matched_by_the_returned_message_id(tmp_path: Path) -> None:
    box = _maildir(tmp_path, ["gmail-no-such-user.eml"])  # no ENVID; its VERP is not configured here
    results = tmp_path / "campaign.results.jsonl"
    results.write_text('{"id": "job-3001", "line": 1, "status": "sent", "message_id": "<job-3001.a1b2c3@example.org>"}\n'
                       'not json\n{"id": "other", "line": 2, "status": "invalid", "message_id": null}\n')
    code, out, err = await dispatcher("bounces", str(box), "--dry-run", cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["job_id"] is None
    code, out, err = await dispatcher("bounces", str(box), "--dry-run", "--results", str(results), cwd=tmp_path)
    assert code == 0, err
    assert json.loads(out)["job_id"] == "job-3001"
    code, _, err = await dispatcher("bounces", str(box), "--results", str(tmp_path / "missing.jsonl"), cwd=tmp_path)
    assert code == 2 and "missing.jsonl" in err and "Traceback" not in err


def _dsn_message(*recipient_blocks: str, envid: str = "job-7") -> bytes:
    blocks = "\r\n\r\n".join(recipient_blocks)
    return (
        "From: MAILER-DAEMON@mx.example.net\r\nTo: bounces@example.org\r\nSubject: report\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=delivery-status; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nSee below.\r\n"
        "--B\r\nContent-Type: message/delivery-status\r\n\r\n"
        f"Reporting-MTA: dns; mx.example.net\r\nOriginal-Envelope-Id: {envid}\r\n\r\n{blocks}\r\n"
        "--B--\r\n").encode()


@pytest.mark.parametrize(("block", "expected"), [
    # the status class decides, whatever the action says
    ("Final-Recipient: rfc822; a@x.example\r\nAction: failed\r\nStatus: 4.2.2", ("delay", "4.2.2", "ignored")),
    ("Final-Recipient: rfc822; a@x.example\r\nAction: delivered\r\nStatus: 4.4.1", ("delay", "4.4.1", "ignored")),
    ("Final-Recipient: rfc822; a@x.example\r\nAction: delayed\r\nStatus: 5.1.1", ("bounce", "5.1.1", "suppressed")),
    # without a status, the action
    ("Final-Recipient: rfc822; a@x.example\r\nAction: failed", ("bounce", None, "ignored")),
    ("Final-Recipient: rfc822; a@x.example\r\nAction: delayed", ("delay", None, "ignored")),
    ("Final-Recipient: rfc822; a@x.example\r\nAction: relayed\r\nStatus: 2.0.0", ("unknown", None, "ignored")),
    # Exim: 5.0.0 in Status, the real code in the diagnostic
    ("Final-Recipient: rfc822; a@x.example\r\nAction: failed\r\nStatus: 5.0.0\r\n"
     "Diagnostic-Code: smtp; 550 5.1.1 no such user", ("bounce", "5.1.1", "suppressed")),
    # a diagnostic of another class does not override
    ("Final-Recipient: rfc822; a@x.example\r\nAction: failed\r\nStatus: 5.0.0\r\n"
     "Diagnostic-Code: smtp; 450 4.2.0 try later", ("bounce", "5.0.0", "ignored")),
])
def test_a_dsn_recipient_block_is_classified_by_status_then_action(block: str, expected: tuple[str, ...]) -> None:
    [report] = classify(_dsn_message(block), None)
    assert (report.type.value, report.status, report.action) == expected
    assert report.recipient == "a@x.example" and report.job_id == "job-7"


def test_a_dsn_reports_every_recipient_block_and_prefers_original_recipient() -> None:
    reports = classify(_dsn_message(
        "Original-Recipient: rfc822; first@x.example\r\nFinal-Recipient: rfc822; alias@x.example\r\n"
        "Action: failed\r\nStatus: 5.1.1",
        "Final-Recipient: rfc822; second@x.example\r\nAction: delayed\r\nStatus: 4.4.7",
        "Action: failed\r\nStatus: 5.1.1"), None)  # no recipient: no report
    assert [(r.recipient, r.type.value) for r in reports] == [("first@x.example", "bounce"),
                                                               ("second@x.example", "delay")]


def test_a_redacted_complaint_names_the_returned_to_and_the_job_of_its_verp_sender() -> None:
    raw = (
        "From: feedback@isp.example\r\nTo: abuse@example.org\r\nSubject: complaint\r\nMIME-Version: 1.0\r\n"
        'Content-Type: multipart/report; report-type=feedback-report; boundary="B"\r\n\r\n'
        "--B\r\nContent-Type: text/plain\r\n\r\nA complaint.\r\n"
        "--B\r\nContent-Type: message/feedback-report\r\n\r\n"
        f"Feedback-Type: abuse\r\nUser-Agent: ISP-FBL/1.0\r\nOriginal-Mail-From: <{VERP.render('job-9')}>\r\n\r\n"
        "--B\r\nContent-Type: text/rfc822-headers\r\n\r\n"
        "From: news@example.org\r\nTo: reader@isp.example\r\nMessage-ID: <m9@example.org>\r\n\r\n"
        "--B--\r\n").encode()
    [report] = classify(raw, VERP)
    assert (report.type.value, report.recipient, report.job_id, report.action) == \
        ("complaint", "reader@isp.example", "job-9", "suppressed")
    assert report.message_id == "<m9@example.org>"
