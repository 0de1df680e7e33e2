"""Campaigns end to end (docs/campaigns.md): ``dispatcher run`` in a subprocess against a
real SMTP server, with templates, unsubscribe headers and DKIM; every check is made on
the message the server received."""

from __future__ import annotations

import base64
import json
import re
import shutil
from collections.abc import Callable
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from smtpserver import FaultyServer, ReceivedMessage
from test_dispatcher import ROOT, dispatcher, results, write_config, write_jobs

pytestmark = pytest.mark.timeout(90)

DOMAIN = "example.org"
SELECTOR = "s2026"


# -- helpers ----------------------------------------------------------------------


def templates(directory: Path, **files: str) -> Path:
    """welcome_subject="..." is written as directory/welcome.subject."""
    directory.mkdir(exist_ok=True)
    for key, content in files.items():
        name, _, part = key.rpartition("_")
        (directory / f"{name}.{part}").write_text(content, encoding="utf-8")
    return directory


def campaign_config(tmp_path: Path, server: FaultyServer, **sections: dict[str, Any]) -> Path:
    """The test server's config plus ``sections`` (templates, unsubscribe, dkim, jobs) as YAML."""
    path = write_config(tmp_path / "config.yaml", server)
    with path.open("a") as f:
        for name, keys in sections.items():
            f.write(f"{name}:\n" + "".join(f"  {k}: {json.dumps(v)}\n" for k, v in keys.items()))
    return path


async def run(tmp_path: Path, jobs: list[dict[str, Any] | str], config: Path) -> tuple[int, str, dict[str, Any]]:
    """Run the jobs; returns (exit status, stderr, results by id or line)."""
    write_jobs(tmp_path / "jobs.jsonl", jobs)
    code, _, err = await dispatcher("run", "jobs.jsonl", "--config", str(config), "--no-progress", cwd=tmp_path)
    written = tmp_path / "jobs.results.jsonl"  # absent after a run that stopped before its first job
    rows = {row["id"] if row["id"] is not None else f"line {row['line']}": row
            for row in (results(written) if written.exists() else [])}
    return code, err, rows


def parsed(message: ReceivedMessage) -> EmailMessage:
    msg = message_from_bytes(message.content, policy=policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def by_rcpt(server: FaultyServer) -> dict[str, EmailMessage]:
    return {m.rcpt_tos[0]: parsed(m) for m in server.messages}


def body(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body((subtype,))
    assert part is not None, f"no text/{subtype} part"
    return str(part.get_content()).replace("\r\n", "\n")


def templated(n: str, **extra: Any) -> dict[str, Any]:
    return {"id": n, "template": "welcome", "to": [f"{n}@example.net"], **extra}


WELCOME = {
    "welcome_subject": "Welcome, {{ name }}\n",
    "welcome_text": "Hello {{ name }},\nyour plan: {{ plan }}.\n",
    "welcome_html": "<p>Hello {{ name }}, your plan: <b>{{ plan }}</b>.</p>\n",
}


# -- rendering --------------------------------------------------------------------


async def test_each_job_renders_its_own_data_and_its_fields_win(server: FaultyServer, tmp_path: Path) -> None:
    templates(tmp_path / "templates", **WELCOME)
    config = campaign_config(tmp_path, server, jobs={"default_from": f"News <news@{DOMAIN}>"})
    code, err, rows = await run(tmp_path, [
        templated("ada", data={"name": "Ada", "plan": "pro"}),
        templated("bob", data={"name": "Bob", "plan": "free"}),
        templated("cy", data={"name": "Cy", "plan": "team"}, subject="Cy, a subject of your own",
                  text="Your own text, {{ name }}.\n", **{"from": "Boss <boss@example.org>"}),
        templated("zoe", data={"name": "Zoë", "plan": "équipe"}),
    ], config)
    assert code == 0, err
    assert {row["status"] for row in rows.values()} == {"sent"}
    got = by_rcpt(server)
    assert got["ada@example.net"]["Subject"] == "Welcome, Ada"
    assert body(got["ada@example.net"], "plain") == "Hello Ada,\nyour plan: pro.\n"
    assert body(got["bob@example.net"], "html") == "<p>Hello Bob, your plan: <b>free</b>.</p>\n"
    assert got["bob@example.net"]["From"] == f"News <news@{DOMAIN}>"  # jobs.default_from
    cy = got["cy@example.net"]
    assert cy["Subject"] == "Cy, a subject of your own" and cy["From"] == "Boss <boss@example.org>"
    assert body(cy, "plain") == "Your own text, {{ name }}.\n"  # a job's own text is not a template
    assert body(cy, "html") == "<p>Hello Cy, your plan: <b>team</b>.</p>\n"  # the part it did not give is
    assert got["zoe@example.net"]["Subject"] == "Welcome, Zoë"
    assert body(got["zoe@example.net"], "plain") == "Hello Zoë,\nyour plan: équipe.\n"

    code, err, _ = await dispatcher("run", "jobs.jsonl", "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert len(server.messages) == 4  # a re-run renders and sends nothing again


async def test_html_is_autoescaped_text_and_subject_are_not(server: FaultyServer, tmp_path: Path) -> None:
    templates(tmp_path / "templates", **WELCOME)
    config = campaign_config(tmp_path, server, jobs={"default_from": f"news@{DOMAIN}"})
    code, err, _ = await run(tmp_path, [templated("tom", data={"name": "Tom & <b>Jerry</b>", "plan": "\"x\""})],
                             config)
    assert code == 0, err
    (msg,) = by_rcpt(server).values()
    assert msg["Subject"] == "Welcome, Tom & <b>Jerry</b>"
    assert body(msg, "plain") == "Hello Tom & <b>Jerry</b>,\nyour plan: \"x\".\n"
    assert body(msg, "html") == "<p>Hello Tom &amp; &lt;b&gt;Jerry&lt;/b&gt;, your plan: <b>&#34;x&#34;</b>.</p>\n"


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.system('id') }}",
    "{{ name.__class__ }}",
])
async def test_a_template_escaping_the_sandbox_is_invalid_naming_template(
        server: FaultyServer, tmp_path: Path, source: str) -> None:
    templates(tmp_path / "templates", **WELCOME, evil_subject="hi", evil_text=f"x\n{source}\n")
    config = campaign_config(tmp_path, server, jobs={"default_from": f"news@{DOMAIN}"})
    code, err, rows = await run(tmp_path, [
        {"id": "evil", "template": "evil", "to": ["a@example.net"], "data": {"name": "x"}},
        templated("ok", data={"name": "Ok", "plan": "pro"}),
    ], config)
    assert code == 1, err
    assert rows["evil"]["status"] == "invalid"
    assert rows["evil"]["error"].startswith("line 1: template: ")
    assert "evil.text line 2" in rows["evil"]["error"]
    assert rows["ok"]["status"] == "sent"  # the batch goes on
    assert [m.rcpt_tos for m in server.messages] == [["ok@example.net"]]


async def test_os_in_a_template_is_an_undefined_variable(server: FaultyServer, tmp_path: Path) -> None:
    templates(tmp_path / "templates", evil_subject="{{ os.system('id') }}")
    config = campaign_config(tmp_path, server, jobs={"default_from": f"news@{DOMAIN}"})
    code, _, rows = await run(tmp_path, [{"id": "evil", "template": "evil", "to": ["a@example.net"]}], config)
    assert code == 1
    assert rows["evil"]["error"].startswith("line 1: data.os: undefined in ")
    assert not server.messages


async def test_an_undefined_variable_is_invalid_naming_data_key_with_file_and_line(
        server: FaultyServer, tmp_path: Path) -> None:
    templates(tmp_path / "templates", card_subject="Hi {{ user.first }}",
              card_text="Hello,\n\nyour code is {{ user.code }}.\n")
    config = campaign_config(tmp_path, server, jobs={"default_from": f"news@{DOMAIN}"})
    code, _, rows = await run(tmp_path, [
        {"id": "no-user", "template": "card", "to": ["a@example.net"], "data": {}},
        {"id": "no-code", "template": "card", "to": ["b@example.net"], "data": {"user": {"first": "B"}}},
        {"id": "ok", "template": "card", "to": ["c@example.net"], "data": {"user": {"first": "C", "code": 7}}},
    ], config)
    assert code == 1
    assert rows["no-user"]["status"] == rows["no-code"]["status"] == "invalid"
    assert rows["no-user"]["error"].startswith("line 1: data.user: undefined in ")
    assert rows["no-user"]["error"].endswith("card.subject line 1")
    assert rows["no-code"]["error"].startswith("line 2: data.user.code: undefined in ")
    assert rows["no-code"]["error"].endswith("card.text line 3")
    assert rows["ok"]["status"] == "sent"
    (msg,) = by_rcpt(server).values()
    assert body(msg, "plain") == "Hello,\n\nyour code is 7.\n"


async def test_a_missing_template_is_invalid_naming_template(server: FaultyServer, tmp_path: Path) -> None:
    templates(tmp_path / "templates", **WELCOME, broken_subject="{% if %}")
    config = campaign_config(tmp_path, server, jobs={"default_from": f"news@{DOMAIN}"})
    code, _, rows = await run(tmp_path, [
        {"id": "gone", "template": "farewell", "to": ["a@example.net"]},
        {"id": "broken", "template": "broken", "to": ["a@example.net"]},
        {"id": "bad-name", "template": "../etc/passwd", "to": ["a@example.net"]},
        {"id": "no-from", "template": "welcome", "to": ["a@example.net"], "data": {"name": "x", "plan": "y"},
         "from": "not an address"},
    ], config)
    assert code == 1
    assert rows["gone"]["error"] == ("line 1: template: no template 'farewell' in templates "
                                     "(farewell.subject, farewell.text or farewell.html)")
    assert rows["broken"]["error"].startswith("line 2: template: ")
    assert "broken.subject line 1" in rows["broken"]["error"]
    assert rows["bad-name"]["error"].startswith("line 3: template: ")
    assert rows["no-from"]["error"].startswith("line 4: from: ")
    assert not server.messages


async def test_templates_dir_that_does_not_exist_stops_the_run_and_records_nothing(
    server: FaultyServer, tmp_path: Path
) -> None:
    """The configuration's mistake, not the jobs': exit 2 naming templates.dir, nothing
    recorded, so that the same command sends every job once the path is fixed."""
    jobs = [{"id": "t", "template": "welcome", "to": ["a@example.net"]}, {"id": "u", "template": "welcome",
                                                                       "to": ["b@example.net"]}]
    config = campaign_config(tmp_path, server, templates={"dir": "nowhere"}, jobs={"default_from": "a@example.org"})
    code, err, rows = await run(tmp_path, jobs, config)
    assert code == 2, err
    assert f"dispatcher: templates.dir: 'nowhere' does not exist (a relative directory is taken from {str(tmp_path)!r})" in err
    assert rows == {} and not server.messages
    templates(tmp_path / "nowhere", **WELCOME)
    code, err, rows = await run(tmp_path, [{**j, "data": {"name": "N", "plan": "P"}} for j in jobs], config)
    assert code == 0, err
    assert {r["status"] for r in rows.values()} == {"sent"} and len(server.messages) == 2


# -- unsubscribe ------------------------------------------------------------------


async def test_unsubscribe_headers_on_composed_and_templated_jobs_rendered_per_job(
        server: FaultyServer, tmp_path: Path) -> None:
    templates(tmp_path / "templates", **WELCOME)
    config = campaign_config(tmp_path, server, jobs={"default_from": f"news@{DOMAIN}"},
                             unsubscribe={"url": "https://example.org/u/{{ id }}?l={{ data.list | default('all') }}",
                                          "mailto": "leave+{{ id }}@example.org"})
    code, err, _ = await run(tmp_path, [
        templated("ada", data={"name": "Ada", "plan": "pro", "list": "news letter"}),
        {"id": "bob", "from": f"news@{DOMAIN}", "to": ["bob@example.net"], "subject": "s", "text": "t\n"},
        {"id": "own", "from": f"news@{DOMAIN}", "to": ["own@example.net"], "subject": "s", "text": "t\n",
         "headers": {"list-unsubscribe": "<mailto:mine@example.org>"}},
        {"id": "raw", "mail_from": f"news@{DOMAIN}", "rcpt_to": ["raw@example.net"],
         "raw": f"From: news@{DOMAIN}\r\nTo: raw@example.net\r\nSubject: raw\r\n\r\nraw\r\n"},
    ], config)
    assert code == 0, err
    got = by_rcpt(server)
    assert got["ada@example.net"]["List-Unsubscribe"] == (
        "<https://example.org/u/ada?l=news%20letter>, <mailto:leave+ada@example.org>")
    assert got["ada@example.net"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert got["bob@example.net"]["List-Unsubscribe"] == (
        "<https://example.org/u/bob?l=all>, <mailto:leave+bob@example.org>")
    assert got["bob@example.net"]["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert got["own@example.net"]["List-Unsubscribe"] == "<mailto:mine@example.org>"  # the job's own wins
    assert got["own@example.net"]["List-Unsubscribe-Post"] is None
    assert got["raw@example.net"]["List-Unsubscribe"] is None  # a raw message is sent as it is


@pytest.mark.parametrize(("unsubscribe", "one_click"), [
    ({"url": "http://example.org/u/{{ id }}"}, False),
    ({"mailto": "unsubscribe@example.org"}, False),
    ({"url": "HTTPS://example.org/u/{{ id }}"}, True),
])
async def test_one_click_only_with_an_https_url(server: FaultyServer, tmp_path: Path,
                                                unsubscribe: dict[str, str], one_click: bool) -> None:
    config = campaign_config(tmp_path, server, unsubscribe=unsubscribe)
    code, err, _ = await run(tmp_path, [{"id": "j", "from": f"news@{DOMAIN}", "to": ["a@example.net"],
                                         "subject": "s", "text": "t\n"}], config)
    assert code == 0, err
    (msg,) = by_rcpt(server).values()
    assert msg["List-Unsubscribe"] is not None
    assert (msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click") is one_click
    if not one_click:
        assert msg["List-Unsubscribe-Post"] is None
    # A URL that cannot give one-click is said once at start, not silently lost.
    assert ("unsubscribe.not_https" in err) is ("url" in unsubscribe and not one_click), err


async def test_an_unsubscribe_url_too_long_for_a_header_line_is_invalid(server: FaultyServer, tmp_path: Path) -> None:
    config = campaign_config(tmp_path, server, unsubscribe={"url": "https://example.org/u/{{ id }}"})
    job = {"from": f"news@{DOMAIN}", "to": ["a@example.net"], "subject": "s", "text": "t\n"}
    code, _, rows = await run(tmp_path, [{"id": "x" * 900, **job}, {"id": "short", **job}], config)
    assert code == 1
    assert rows["x" * 900]["error"].startswith("line 1: unsubscribe.url: rendered ")
    assert rows["short"]["status"] == "sent"


# -- DKIM -------------------------------------------------------------------------


def private_pem(algorithm: str) -> bytes:
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "rsa-sha256":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        key = ed25519.Ed25519PrivateKey.generate()
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def txt_record(pem: bytes) -> bytes:
    key = serialization.load_pem_private_key(pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return b"v=DKIM1; k=rsa; p=" + base64.b64encode(der)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return b"v=DKIM1; k=ed25519; p=" + base64.b64encode(raw)


def dns_for(pem: bytes) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` that knows only the test key's TXT record, computed here
    from the private key (not from our signer)."""
    record = txt_record(pem)

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == f"{SELECTOR}._domainkey.{DOMAIN}.".encode() else None

    return lookup


def dkim_config(tmp_path: Path, server: FaultyServer, algorithm: str, **sections: dict[str, Any]) -> tuple[Path, bytes]:
    pem = private_pem(algorithm)
    (tmp_path / "dkim.pem").write_bytes(pem)
    config = campaign_config(tmp_path, server, dkim={"domain": DOMAIN, "selector": SELECTOR,
                                                     "private_key": "dkim.pem", "algorithm": algorithm}, **sections)
    return config, pem


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
async def test_every_delivered_message_verifies_with_dkimpy(server: FaultyServer, tmp_path: Path,
                                                            algorithm: str) -> None:
    templates(tmp_path / "templates", **WELCOME)
    (tmp_path / "report.pdf").write_bytes(b"%PDF-1.4\n" + bytes(range(256)) * 30)
    config, pem = dkim_config(tmp_path, server, algorithm, jobs={"default_from": f"Nëws <news@{DOMAIN}>"},
                              unsubscribe={"url": "https://example.org/u/{{ id }}"})
    composed = {"from": f"news@{DOMAIN}", "subject": "Hello", "text": "Hello.\n"}
    code, err, rows = await run(tmp_path, [
        {"id": "composed", **composed, "to": ["composed@example.net"], "cc": ["cc@example.net"]},
        templated("templated", data={"name": "Ada", "plan": "pro"}),
        {"id": "raw", "mail_from": f"news@{DOMAIN}", "rcpt_to": ["raw@example.net"],
         "raw": f"From: news@{DOMAIN}\nTo: raw@example.net\nSubject: raw\n\nA raw message, LF only.\n.dot\n"},
        {"id": "attached", **composed, "to": ["attached@example.net"], "html": "<p>Hello.</p>",
         "attachments": [{"filename": "report.pdf", "path": "report.pdf"},
                         {"filename": "résumé.txt", "content_base64": base64.b64encode("Grüße\n".encode()).decode()}]},
        {"id": "non-ascii", "from": f"Zoë Müller <news@{DOMAIN}>", "to": ["Inès Dupré <nonascii@example.net>"],
         "subject": "Grüße aus Köln — " + "ünïcödé " * 12, "text": "Schöne Grüße,\n" + "ß" * 2000 + "\n",
         "html": "<p>Schöne Grüße</p>"},
        templated("templated-non-ascii", data={"name": "Zoë", "plan": "équipe"}),
    ], config)
    assert code == 0, err
    assert {row["status"] for row in rows.values()} == {"sent"}, rows
    assert len(server.messages) == 6
    lookup = dns_for(pem)
    for message in server.messages:
        head = message.content.split(b"\r\n\r\n", 1)[0]
        assert head.startswith(b"DKIM-Signature: "), message.rcpt_tos
        assert f"a={algorithm};".encode() in head.replace(b"\r\n ", b"").replace(b" ", b"")
        assert dkim.verify(message.content, dnsfunc=lookup), message.rcpt_tos
    templated_msg = next(m for m in server.messages if m.rcpt_tos == ["templated@example.net"])
    signature = templated_msg.content.split(b"\r\n\r\n", 1)[0].replace(b"\r\n", b"").replace(b" ", b"")
    assert (b"h=from:from:to:to:cc:subject:subject:date:message-id:mime-version:content-type:reply-to:"
            b"list-unsubscribe:list-unsubscribe:list-unsubscribe-post:list-unsubscribe-post;") in signature

    changes: list[tuple[str, Callable[[bytes], bytes]]] = [
        ("body", lambda m: m.replace(b"Hello Ada", b"Hello Eve")),
        ("unsubscribe URL", lambda m: m.replace(b"/u/templated>", b"/u/someone-else>")),
        ("one-click removed", lambda m: m.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b"")),
        ("line appended", lambda m: m + b"P.S.\r\n"),
    ]
    for what, change in changes:
        altered = change(templated_msg.content)
        assert altered != templated_msg.content, what
        assert not dkim.verify(altered, dnsfunc=lookup), what


async def test_a_raw_message_without_from_is_invalid_naming_raw_when_signing(
        server: FaultyServer, tmp_path: Path) -> None:
    config, _ = dkim_config(tmp_path, server, "ed25519-sha256")
    code, _, rows = await run(tmp_path, [
        {"id": "no-from", "mail_from": f"news@{DOMAIN}", "rcpt_to": ["a@example.net"],
         "raw": "To: a@example.net\r\nSubject: x\r\n\r\nbody\r\n"},
        {"id": "ok", "mail_from": f"news@{DOMAIN}", "rcpt_to": ["b@example.net"],
         "raw": f"From: news@{DOMAIN}\r\nSubject: x\r\n\r\nbody\r\n"},
    ], config)
    assert code == 1
    assert rows["no-from"]["status"] == "invalid"
    assert rows["no-from"]["error"].startswith("line 1: raw: no From header")
    assert rows["ok"]["status"] == "sent"


async def test_a_dkim_key_that_cannot_be_used_stops_the_run_before_anything_is_sent(
        server: FaultyServer, tmp_path: Path) -> None:
    config, _ = dkim_config(tmp_path, server, "rsa-sha256")
    (tmp_path / "dkim.pem").write_bytes(b"-----BEGIN PRIVATE KEY-----\nnot a key\n-----END PRIVATE KEY-----\n")
    write_jobs(tmp_path / "jobs.jsonl", [{"id": "j", "from": f"news@{DOMAIN}", "to": ["a@example.net"],
                                          "subject": "s", "text": "t"}])
    code, out, err = await dispatcher("run", "jobs.jsonl", "--config", str(config), cwd=tmp_path)
    assert code == 2
    assert err.strip() == "dispatcher: dkim.private_key: not a PEM private key cryptography can read"
    assert "not a key" not in out + err
    assert not server.messages and not (tmp_path / "jobs.results.jsonl").exists()
    code, _, err = await dispatcher("check-config", str(config), cwd=tmp_path)
    assert code == 2
    assert err.strip() == f"{config}: dkim.private_key: not a PEM private key cryptography can read"


async def test_check_config_prints_the_txt_record_to_publish(server: FaultyServer, tmp_path: Path) -> None:
    config, pem = dkim_config(tmp_path, server, "rsa-sha256",
                              unsubscribe={"url": "https://example.org/u/{{ id }}", "mailto": "u@example.org"})
    code, out, err = await dispatcher("check-config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert f"publish this TXT record at {SELECTOR}._domainkey.{DOMAIN}:" in out
    record = txt_record(pem).decode()
    strings = re.findall(r'"([^"]*)"', out.split("_domainkey", 1)[1].split("\n")[1])
    assert "".join(strings) == record and len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "(one-click, RFC 8058)" in out
    assert pem.split(b"\n")[1].decode() not in out + err  # never the private key


# -- the example ------------------------------------------------------------------


async def test_the_example_campaign_runs_from_a_fresh_checkout(tmp_path: Path) -> None:
    """The README's command, in a copy of examples/, against the built-in capture server."""
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    code, _, err = await dispatcher("run", "examples/campaign.jsonl", "--config", "examples/campaign.yaml",
                                    cwd=tmp_path)
    assert code == 0, err
    assert "capture server" in err
    count = sum(1 for line in (ROOT / "examples" / "campaign.jsonl").read_text().splitlines() if line.strip())
    rows = results(tmp_path / "examples" / "campaign.results.jsonl")
    assert len(rows) == count and {row["status"] for row in rows} == {"sent"}
    delivered = [message_from_bytes(path.read_bytes(), policy=policy.default)
                 for path in (tmp_path / "outbox" / "new").iterdir()]
    assert len(delivered) == count
    by_to = {str(msg["To"]): msg for msg in delivered}
    tom = by_to["tom@example.net"]
    assert tom["Subject"] == "Welcome to Dispatcher, Tom & Jerry <cartoons>"
    assert "Hello Tom &amp; Jerry &lt;cartoons&gt;," in body(tom, "html")
    assert tom["List-Unsubscribe"] == "<https://example.org/u/c-0005>, <mailto:unsubscribe@example.org>"
    assert tom["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    assert by_to["olu@example.net"]["List-Unsubscribe"] == "<mailto:leave-olu@example.org>"
