"""Peak RSS of ``dispatcher run`` with large attachments against a slow relay (issue 17).

    ./dev python -m benchmarks.large_attachments                       # 2 MB x 400, 10 MB x 100
    ./dev python -m benchmarks.large_attachments --rows 2:400,10:100 --delay 0.5 --size 4

Each row: a jobs file of N jobs, each attaching the same file of M MB (random bytes,
so base64 makes ~1.37 M MB a message); a relay on 127.0.0.1 (aiosmtpd, in this
process) that answers every end of DATA ``--delay`` seconds late and throws the
message away; ``dispatcher run`` in a child process with the default configuration
but for the relay and ``pool.size``. The figure is the peak RSS of the largest
process of the run (``wait4``'s ``ru_maxrss``: the run or its compose process).
``--max-bytes-in-flight`` overrides ``pool.max_bytes_in_flight`` (default: the
library's, 256 MiB). Rows are bounded by their job counts; a row that runs longer
than ``--deadline`` seconds is stopped (SIGTERM, then SIGKILL) and says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

MB = 1 << 20


class _SlowSink:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.received = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        await asyncio.sleep(self.delay)
        self.received += 1
        return "250 OK"


async def _row(workdir: Path, megabytes: int, jobs: int, port: int, args: argparse.Namespace) -> dict[str, Any]:
    attachment = workdir / f"attachment-{megabytes}mb.bin"
    if not attachment.exists():
        attachment.write_bytes(os.urandom(megabytes * MB))
    jobs_file = workdir / f"jobs-{megabytes}mb.jsonl"
    with jobs_file.open("w") as out:
        for i in range(jobs):
            out.write(json.dumps({"id": f"j{i}", "from": "sender@example.org", "to": [f"r{i}@example.net"],
                                  "subject": f"attachment {i}", "text": "See the attachment.\n",
                                  "attachments": [{"filename": "data.bin", "path": attachment.name}]}) + "\n")
    results = workdir / f"jobs-{megabytes}mb.results.jsonl"
    results.unlink(missing_ok=True)
    config = workdir / "config.yaml"
    pool = f"pool:\n  size: {args.size}\n"
    if args.max_bytes_in_flight is not None:
        pool += f"  max_bytes_in_flight: {args.max_bytes_in_flight}\n"
    config.write_text(f"smtp:\n  hostname: 127.0.0.1\n  port: {port}\n  timeout: 60\n{pool}")
    command = [sys.executable, "-m", "dispatcher.cli", "run", str(jobs_file), "--config", str(config),
               "--no-progress"]
    started = time.monotonic()
    # Popen, not asyncio's subprocess: its child watcher would reap the run before wait4.
    proc = subprocess.Popen(command, cwd=workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE if os.environ.get("BENCH_DEBUG") else subprocess.DEVNULL)
    stopped = False
    try:
        await asyncio.wait_for(asyncio.shield(_reap(proc.pid)), args.deadline)
    except TimeoutError:
        stopped = True
        os.kill(proc.pid, signal.SIGTERM)
    code, peak_kb = await _reap(proc.pid)
    elapsed = time.monotonic() - started
    if proc.stderr is not None:
        print(proc.stderr.read().decode()[-2000:], file=sys.stderr)
    sent = sum(1 for line in results.read_text().splitlines() if '"sent"' in line) if results.exists() else 0
    return {"attachment_mb": megabytes, "jobs": jobs, "sent": sent, "exit": code, "seconds": round(elapsed, 1),
            "peak_rss_mb": round(peak_kb / 1024), "stopped_at_deadline": stopped}


_reaped: dict[int, tuple[int, int]] = {}


async def _reap(pid: int) -> tuple[int, int]:
    """(exit status, ru_maxrss in KiB) of ``pid``, once it ends (wait4 in a thread)."""
    if pid not in _reaped:
        _, status, usage = await asyncio.to_thread(os.wait4, pid, 0)
        _reaped[pid] = (os.waitstatus_to_exitcode(status), usage.ru_maxrss)
    return _reaped[pid]


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.large_attachments")
    parser.add_argument("--rows", default="2:400,10:100", help="MB:JOBS,... (default 2:400,10:100)")
    parser.add_argument("--delay", type=float, default=0.5, help="seconds the relay takes per DATA")
    parser.add_argument("--size", type=int, default=4, help="pool.size")
    parser.add_argument("--max-bytes-in-flight", type=int, default=None)
    parser.add_argument("--deadline", type=float, default=600.0)
    args = parser.parse_args(argv)

    sink = _SlowSink(args.delay)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(sink, data_size_limit=None, enable_SMTPUTF8=True),
                                      "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="dispatcher-bench-") as tmp:
            for spec in args.rows.split(","):
                megabytes, jobs = (int(x) for x in spec.split(":"))
                row = await _row(Path(tmp), megabytes, jobs, port, args)
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        server.close()
    print(f"\n| attachment | jobs | sent | exit | seconds | peak RSS | (relay {args.delay:g} s/DATA, pool.size "
          f"{args.size}, max_bytes_in_flight {args.max_bytes_in_flight or 'default'}) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        note = "stopped at deadline" if r["stopped_at_deadline"] else ""
        print(f"| {r['attachment_mb']} MB | {r['jobs']} | {r['sent']} | {r['exit']} | {r['seconds']} | "
              f"{r['peak_rss_mb']} MB | {note} |")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
