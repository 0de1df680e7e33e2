"""µs of CPU per job for building the message, ours against the standard library's.

    ./dev python -m benchmarks.build [--jobs 20000] [--repeat 5]

Both builders run in this one process on the same validated jobs (the ``e2e`` rows' 2 KB
text job, and the same with a 2 KB html alternative), best of ``--repeat`` rounds;
the compose-stage row is a job line parsed, validated (strict addresses, each job to
its own recipient) and built; ``json`` compares the stdlib and orjson for the results row and the job line. The
stdlib builder is the one ``dispatcher.compose.jobs.build`` used before issue 9, kept here to
measure against.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import time
from collections.abc import Callable
from email.charset import QP, Charset
from email.header import Header
from email.message import Message
from email.mime.multipart import MIMEMultipart
from email.mime.text import MIMEText
from email.policy import Compat32
from email.utils import formataddr, formatdate, make_msgid, parseaddr
from typing import Any

from benchmarks.messages import SENDER, _text
from dispatcher.compose.jobs import ComposedJob, Line, build, parse_job

_UTF8_QP = Charset("utf-8")
_UTF8_QP.body_encoding = QP
_LONG_LINE = re.compile(r"[^\n]{990}")


class _Headers(Compat32):
    def fold_binary(self, name: str, value: Any) -> bytes:
        if isinstance(value, str) and value.isascii() and len(name) + len(value) < 990 and "\n" not in value:
            return f"{name}: {value}{self.linesep}".encode("ascii")
        return super().fold_binary(name, value)


_POLICY = _Headers(linesep="\r\n")


def _stdlib_text(content: str, subtype: str) -> MIMEText:
    if content.isascii() and not _LONG_LINE.search(content):
        return MIMEText(content, subtype, "us-ascii")
    return MIMEText(content, subtype, _UTF8_QP)  # type: ignore[arg-type]


def _stdlib_mailbox(value: str) -> str:
    if value.isascii():
        return value
    name, address = parseaddr(value)
    return formataddr((name, address), charset="utf-8") if name else address


def stdlib_build(job: ComposedJob) -> bytes:
    """The text/html shapes of the builder before issue 9 (email.mime, compat32)."""
    if job.text is not None and job.html is not None:
        msg: Message = MIMEMultipart("alternative", _subparts=[_stdlib_text(job.text, "plain"),
                                                               _stdlib_text(job.html, "html")])
    elif job.html is not None:
        msg = _stdlib_text(job.html, "html")
    else:
        msg = _stdlib_text(job.text or "", "plain")
    sender = parseaddr(job.from_)[1]
    msg["From"] = _stdlib_mailbox(job.from_)
    msg["To"] = ", ".join(_stdlib_mailbox(a) for a in job.to)
    msg["Subject"] = job.subject if job.subject.isascii() else Header(job.subject, "utf-8").encode()
    for name, value in job.headers.items():
        msg[name] = value if value.isascii() else Header(value, "utf-8").encode()
    msg["Message-ID"] = make_msgid(domain=sender.rpartition("@")[2] or None)
    msg["Date"] = formatdate(localtime=True)
    return msg.as_bytes(policy=_POLICY)


def jobs(count: int, html: bool) -> list[ComposedJob]:
    text = _text(1700).replace("\r\n", "\n")
    document: dict[str, Any] = {"from": SENDER, "to": ["user1@example.net"], "subject": "Benchmark job", "text": text}
    if html:
        document["html"] = "<html><body>" + "".join(f"<p>{line}</p>\n" for line in text.splitlines()) + "</body></html>"
    out = []
    for i in range(count):
        raw = json.dumps({"id": f"job-{i}", **document}).encode()
        job = parse_job(Line(i + 1, raw, len(raw)))
        assert isinstance(job, ComposedJob)
        out.append(job)
    return out


def job_lines(count: int, named: bool) -> list[Line]:
    """The text job's lines, each to its own recipient (``Name <addr>`` when ``named``)."""
    text = _text(1700).replace("\r\n", "\n")
    out = []
    for i in range(count):
        to = f"User {i} <user{i}@example.net>" if named else f"user{i}@example.net"
        raw = json.dumps({"id": f"job-{i}", "from": SENDER, "to": [to], "subject": "Benchmark job",
                          "text": text}).encode()
        out.append(Line(i + 1, raw, len(raw)))
    return out


def per_job_us(function: Callable[[Any], Any], items: list[Any], repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for item in items:
            function(item)
        best = min(best, time.process_time() - start)
    return best / len(items) * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.build", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args(argv)
    print("| build, µs CPU per job | stdlib (before) | dispatcher.compose.mime (jobs.build) |")
    print("|---|---|---|")
    for shape, html in (("text 2 KB", False), ("html+text 2+2 KB", True)):
        items = jobs(args.jobs, html)
        print(f"| {shape} | {per_job_us(stdlib_build, items, args.repeat):.1f} "
              f"| {per_job_us(build, items, args.repeat):.1f} |")
    print()
    print("| compose stage: parse_job + build, µs CPU per job | µs |")
    print("|---|---|")
    for shape, named in (("text 2 KB, to: addr", False), ("text 2 KB, to: Name <addr>", True)):
        print(f"| {shape} | {per_job_us(lambda line: build(parse_job(line)), job_lines(args.jobs, named), args.repeat):.1f} |")
    try:
        orjson = importlib.import_module("orjson")
    except ImportError:
        print("orjson is not installed: JSON rows skipped")
        return
    row = {"id": "job-12345", "line": 12346, "status": "sent", "attempts": 1, "code": 250,
           "response": "2.0.0 Ok: queued as 4XyZ1234", "refused": {}, "error": None, "elapsed_ms": 3.1}
    line = json.dumps({"id": "job-1", "from": SENDER, "to": ["user1@example.net"], "subject": "Benchmark job",
                       "text": _text(1700).replace("\r\n", "\n")}).encode()
    rows, lines = [row] * args.jobs, [line] * args.jobs
    print()
    print("| JSON, µs CPU per job | json | orjson |")
    print("|---|---|---|")
    print(f"| results row: dumps + encode | {per_job_us(lambda r: json.dumps(r).encode(), rows, args.repeat):.2f} "
          f"| {per_job_us(orjson.dumps, rows, args.repeat):.2f} |")
    print(f"| job line (2 KB): loads | {per_job_us(json.loads, lines, args.repeat):.2f} "
          f"| {per_job_us(orjson.loads, lines, args.repeat):.2f} |")


if __name__ == "__main__":
    main()
