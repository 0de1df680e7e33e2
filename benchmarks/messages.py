"""The messages and job files the benchmarks send: built once, the same for every row."""

from __future__ import annotations

import json
import os
import random
from email.message import EmailMessage
from email.policy import SMTP
from pathlib import Path

SENDER = "bench@example.org"

_WORDS = ("delivery queue relay envelope recipient session transaction pipelining "
          "throughput latency connection message header body attachment reply").split()


def _text(size: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    lines, length = [], 0
    while length < size:
        line = " ".join(rng.choice(_WORDS) for _ in range(6))
        lines.append(line)
        length += len(line) + 2
    return "\r\n".join(lines)[:size].rstrip() + "\r\n"


def recipients(count: int) -> list[str]:
    return [f"user{i}@example.net" for i in range(1, count + 1)]


def build(total_size: int = 2048, recipient_count: int = 1, attachment_bytes: int = 0) -> tuple[bytes, list[str]]:
    """A wire-ready (CRLF) message of about ``total_size`` bytes, and its recipients.

    With ``attachment_bytes``, a random binary attachment of that size is added (base64
    on the wire: about 1.37 times larger).
    """
    to = recipients(recipient_count)
    message = EmailMessage(policy=SMTP)
    message["From"] = SENDER
    message["To"] = ", ".join(to)
    message["Subject"] = "Benchmark message"
    message["Message-ID"] = "<bench-1@example.org>"
    message["Date"] = "Tue, 25 Nov 2025 00:00:00 +0000"
    head = len(message.as_bytes())
    message.set_content(_text(max(64, total_size - head - 120)))
    if attachment_bytes:
        payload = random.Random(2).randbytes(attachment_bytes)
        message.add_attachment(payload, maintype="application", subtype="octet-stream", filename="data.bin")
    return message.as_bytes(), to


def write_jobs(path: Path, count: int, text_size: int = 1700, html: bool = False) -> Path:
    """A JSON Lines file of ``count`` composed jobs (~2 KB messages; ``html``: the same
    text as a ~2 KB html alternative too), written in chunks."""
    text = _text(text_size).replace("\r\n", "\n")
    template = {"from": SENDER, "to": ["user1@example.net"], "subject": "Benchmark job", "text": text}
    if html:
        template["html"] = "<html><body>" + "".join(f"<p>{line}</p>\n" for line in text.splitlines()) + "</body></html>"
    tail = json.dumps(template)[1:]  # '"from": ... }' - every line shares it
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="ascii") as out:
        chunk: list[str] = []
        for i in range(count):
            chunk.append(f'{{"id": "job-{i}", {tail}\n')
            if len(chunk) == 10_000:
                out.write("".join(chunk))
                chunk.clear()
        out.write("".join(chunk))
    os.replace(tmp, path)
    return path


def write_templated_jobs(directory: Path, count: int, text_size: int = 1700) -> tuple[Path, Path]:
    """``count`` templated jobs (``{"id", "template", "to", "data"}``) and the templates
    directory they name: a subject and a ~2 KB text with three variables, the same size
    as ``write_jobs``'s messages. Returns (jobs file, templates directory)."""
    templates = directory / "templates"
    templates.mkdir(parents=True, exist_ok=True)
    (templates / "bench.subject").write_text("Benchmark job for {{ name }}\n")
    body = _text(text_size - 80).replace("\r\n", "\n")
    (templates / "bench.text").write_text("Hello {{ name }},\n\n" + body + "\nYour plan: {{ plan }} (job {{ id }}).\n")
    path = directory / "templated.jsonl"
    with path.open("w", encoding="ascii") as out:
        chunk: list[str] = []
        for i in range(count):
            chunk.append(f'{{"id": "job-{i}", "template": "bench", "to": ["user{i % 1000}@example.net"], '
                         f'"data": {{"name": "User {i}", "plan": "pro"}}}}\n')
            if len(chunk) == 10_000:
                out.write("".join(chunk))
                chunk.clear()
        out.write("".join(chunk))
    return path, templates


def write_dkim_key(path: Path) -> Path:
    """A 2048-bit RSA key (PEM), as a DKIM signer would use."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path
