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
