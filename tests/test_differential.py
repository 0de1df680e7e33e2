"""Generated jobs checked by independent implementations.

The jobs of ``test_mime``'s generator (non-ASCII in every field, long words, RFC 2231
filenames, encoded-word lookalikes, injection attempts, every body and attachment shape)
are built by ``dispatcher.compose.mime``, signed with an rsa-sha256 and an ed25519-sha256 key
(``pool.dkim.sign_all``), then:

- both signatures verify with dkimpy and with Node's ``mailauth`` (tests/verify_mail.js),
  and copies with a Subject, Cc, From or List-Unsubscribe added on top, or Reply-To
  replaced, verify with neither signature;
- Python's ``email`` parses each back equal to its job (``test_mime.check``);
- Node's ``mailparser`` parses each back equal to its job: subject, addresses, text,
  html, attachment names, types and bytes (but for three liberties it takes: see
  ``_spaces``, ``_type`` and the filenames in ``_mailparser_equal``).

Node and the two packages (pinned in tests/package.json) are installed by .ci/run; run
``npm ci --prefix tests`` once to have them locally. Without them the test skips, and
fails under CI=true.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import dkim  # type: ignore[import-untyped]
import pytest
from _support import missing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from test_mime import _build, _display, _expected_mailbox, _lines, check, generated

from pool.dkim import DKIMSigner, sign_all

pytestmark = pytest.mark.timeout(120)

HERE = Path(__file__).resolve().parent
JOBS = int(os.environ.get("DIFFERENTIAL_JOBS", "400"))
DOMAIN = "example.org"


def _node() -> str:
    node = shutil.which("node")
    absent = node is None or not (HERE / "node_modules" / "mailauth").is_dir() \
        or not (HERE / "node_modules" / "mailparser").is_dir()
    if absent:
        missing("node, mailauth or mailparser missing (npm ci --prefix tests; .ci/run does it)")
    assert node is not None
    return node


def _signers() -> list[DKIMSigner]:
    none = serialization.NoEncryption()
    pem = serialization.Encoding.PEM
    pkcs8 = serialization.PrivateFormat.PKCS8
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).private_bytes(pem, pkcs8, none)
    ed_key = ed25519.Ed25519PrivateKey.generate().private_bytes(pem, pkcs8, none)
    return [DKIMSigner(domain=DOMAIN, selector="rsa", private_key=rsa_key),
            DKIMSigner(domain=DOMAIN, selector="ed", private_key=ed_key, algorithm="ed25519-sha256")]


def _spaces(text: str) -> str:
    """White space as mailparser gives it: it unfolds a folded header into one space,
    where RFC 5322 section 2.2.3 keeps the white space that follows the line break, and
    trims the value."""
    return re.sub(r"[ \t]+", " ", text).strip(" ")


def _type(content_type: str) -> str:
    """mailparser names application/octet-stream by the filename's extension instead."""
    kind = content_type.split(";")[0].lower()
    return "" if kind == "application/octet-stream" else kind


def _mailparser_equal(parsed: dict[str, Any], job: dict[str, Any]) -> list[str]:
    """What mailparser read differently from the job (empty: equal)."""
    wrong = []

    def mailboxes(values: list[str]) -> list[tuple[str, str]]:
        return [(_display(name), address.lower()) for name, address in map(_expected_mailbox, values)]

    def read(field: str) -> list[tuple[str, str]]:
        return [(_display(a["name"] or ""), (a["address"] or "").lower()) for a in parsed[field]]

    for field, values in (("from", [job["from"]]), ("to", job["to"]), ("cc", job["cc"]),
                          ("reply_to", [job["reply_to"]] if job["reply_to"] else [])):
        if read(field) != mailboxes(values):
            wrong.append(field)
    if _spaces(parsed["subject"] or "") != _spaces(job["subject"]):
        wrong.append("subject")
    text, html = job["text"], job["html"]
    if html is None or text is not None:
        if _lines(parsed["text"] or "").rstrip("\n") != _lines(text or "").rstrip("\n"):
            wrong.append("text")
    if html is not None and _lines(parsed["html"] or "").rstrip("\n") != _lines(html).rstrip("\n"):
        wrong.append("html")
    expected = [(filename, _type(content_type), hashlib.sha256(content).hexdigest())
                for filename, content_type, content in job["attachments"]]
    got = [(a["filename"], _type(a["content_type"]), a["sha256"]) for a in parsed["attachments"]]
    # mailparser decodes an encoded-word lookalike ('=?utf-8?q?x?=') found inside an RFC
    # 2231 filename, which RFC 2047 section 5 says is never one (Python's email does not):
    # such names are not compared (their bytes and types are).
    got = [(None if "=?" in want[0] else name, *rest) for (name, *rest), want in zip(got, expected, strict=False)]
    expected = [(None if "=?" in name else name, *rest) for name, *rest in expected]
    if len(got) != len(expected) or any(
            (name, digest) != (want_name, want_digest) or (want_type and kind != want_type)
            for (name, kind, digest), (want_name, want_type, want_digest) in zip(got, expected, strict=False)):
        wrong.append("attachments")
    return wrong


def _prepend(header: bytes) -> Any:
    """Adds ``header`` on top of the header (right under the signatures)."""
    def change(message: bytes) -> bytes:
        return header + b"\r\n" + message
    return change


def _replace_reply_to(message: bytes) -> bytes:
    head, body = message.split(b"\r\n\r\n", 1)
    head = re.sub(rb"(?im)^reply-to:.*(\r\n[ \t].*)*\r\n", b"", head + b"\r\n").removesuffix(b"\r\n")
    return head + b"\r\nReply-To: evil@evil.example\r\n\r\n" + body


_TAMPERINGS = [_prepend(b"Subject: Your account is locked"), _prepend(b"Cc: evil@evil.example"),
               _prepend(b"List-Unsubscribe: <https://evil.example/u>"), _replace_reply_to,
               _prepend(b"From: security@example.org")]


def test_generated_jobs_verify_and_parse_equal_with_independent_implementations() -> None:
    node = _node()
    signers = _signers()
    jobs = generated(JOBS, seed=16)
    messages = [sign_all(signers, _build(job)) for job in jobs]
    records = {signer.dns_name: signer.dns_record() for signer in signers}

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        record = records.get(name.decode().rstrip("."))
        return record.encode() if record is not None else None

    counts: Counter[str] = Counter()
    for job, message in zip(jobs, messages, strict=True):
        check(message, job, wire=True)  # Python's email reads it back equal; valid 7-bit SMTP
        counts["parsed equal by Python's email"] += 1
        verifier = dkim.DKIM(message)
        if all(verifier.verify(idx=i, dnsfunc=lookup) for i in range(len(signers))):
            counts["verified by dkimpy (both signatures)"] += 1

    # Headers an attacker adds or replaces after signing (oversigning, RFC 6376 section 8.15).
    tampered = [change(m) for m in messages[:25] for change in _TAMPERINGS]
    every = messages + tampered
    payload = json.dumps({"dns": records, "messages": [base64.b64encode(m).decode() for m in every]})
    done = subprocess.run([node, str(HERE / "verify_mail.js")], input=payload.encode(), capture_output=True,
                          timeout=100, check=False)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    results = json.loads(done.stdout)
    assert len(results) == len(every)
    results, after_tampering = results[:len(jobs)], results[len(jobs):]
    passed = [r["dkim"] for r in after_tampering if any(d["result"] == "pass" for d in r["dkim"])]
    assert not passed, passed
    differences: Counter[str] = Counter()
    for job, result in zip(jobs, results, strict=True):
        outcomes = sorted((r["algo"], r["result"]) for r in result["dkim"])
        if outcomes == [("ed25519-sha256", "pass"), ("rsa-sha256", "pass")]:
            counts["verified by mailauth (both signatures)"] += 1
        else:
            differences[f"mailauth: {outcomes} {[r['comment'] for r in result['dkim']]}"] += 1
        wrong = _mailparser_equal(result, job)
        if not wrong:
            counts["parsed equal by mailparser"] += 1
        differences.update(f"mailparser: {field}" for field in wrong)
    print(f"\n{len(jobs)} messages: " + ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))
          + f"; {len(after_tampering)} tampered copies, none verified by mailauth")
    assert not differences, differences
    assert all(n == len(jobs) for n in counts.values()), counts
