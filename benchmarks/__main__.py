"""``./dev python -m benchmarks [--quick] [--reps N] [--skip-memory]``

Measures, in one run against one sink, SMTPPool beside what a user would pick
instead: a minimal hand-written aiosmtplib pool, naive ``aiosmtplib.send`` per message
and Postfix's own ``smtp-source``; then ``dispatcher run`` end to end, a relay at
2 ms RTT through a delaying proxy, and the batch command's peak memory. Every client
runs in its own process (its CPU is its own); rows are alternated within each
repetition; each figure is the median of the repetitions with min–max.
Writes the table to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PY = sys.executable


@dataclass
class Row:
    group: str
    label: str
    spec: dict[str, Any]
    rates: list[float] = field(default_factory=list)
    cpus: list[float] = field(default_factory=list)  # client CPU seconds per 1,000 messages
    note: str = ""

    def median(self) -> float:
        return statistics.median(self.rates) if self.rates else 0.0

    def cell(self) -> str:
        if not self.rates:
            return "n/a"
        return f"{self.median():,.0f} ({min(self.rates):,.0f}–{max(self.rates):,.0f})"

    def cpu_cell(self) -> str:
        return f"{statistics.median(self.cpus):.3f}" if self.cpus else "n/a"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port}")


def find_smtp_sink(install: bool) -> str | None:
    for candidate in (shutil.which("smtp-sink"), "/usr/sbin/smtp-sink"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    if install and os.geteuid() == 0:
        print("installing Postfix's smtp-sink (Debian package postfix; the daemon is not started)...", file=sys.stderr)
        script = (
            "set -e; printf '#!/bin/sh\\nexit 101\\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; "
            "echo 'postfix postfix/main_mailer_type select No configuration' | debconf-set-selections; "
            "apt-get update -qq; DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postfix; "
            "rm -f /usr/sbin/policy-rc.d"
        )
        subprocess.run(["bash", "-c", script], check=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return find_smtp_sink(install=False)
    return None


@contextmanager
def sink(install: bool) -> Iterator[tuple[int, str]]:
    port = free_port()
    binary = find_smtp_sink(install)
    if binary:
        # -u: the user to run as; backlog 1000. PIPELINING is advertised by default.
        command = [binary, "-u", "root" if os.geteuid() == 0 else os.environ.get("USER", "nobody"),
                   f"127.0.0.1:{port}", "1000"]
        name = "Postfix smtp-sink"
    else:
        command = [PY, "-m", "benchmarks.aiosmtpd_sink", str(port)]
        name = "aiosmtpd sink (smtp-sink not found)"
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, name
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextmanager
def delay_proxy(upstream: int, delay_ms: float) -> Iterator[int]:
    port = free_port()
    proc = subprocess.Popen([PY, "-m", "benchmarks.delay_proxy", str(port), str(upstream), str(delay_ms)],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def run_client(spec: dict[str, Any]) -> tuple[float, float]:
    out = subprocess.run([PY, "-m", "benchmarks.client", json.dumps(spec)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    if out.returncode != 0:
        raise RuntimeError(f"client failed: {spec}\n{out.stderr[-2000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    return result["messages"] / result["seconds"], result["cpu"] / result["messages"] * 1000


def run_smtp_source(port: int, count: int, sessions: int) -> tuple[float, float] | None:
    binary = shutil.which("smtp-source") or ("/usr/sbin/smtp-source" if os.path.exists("/usr/sbin/smtp-source") else None)
    if not binary:
        return None
    before = os.times()
    started = time.perf_counter()
    subprocess.run([binary, "-s", str(sessions), "-m", str(count), "-l", "2000", "-f", "bench@example.org",
                    "-t", "rcpt@example.net", f"127.0.0.1:{port}"], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=300)
    elapsed = time.perf_counter() - started
    after = os.times()
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return count / elapsed, cpu / count * 1000


def write_jobs(path: Path, count: int, raw: bool) -> None:
    body = ("The quick brown fox jumps over the lazy dog, again and again. " * 32)[:2000]
    with path.open("w") as f:
        for i in range(count):
            if raw:
                message = (f"From: bench@example.org\r\nTo: rcpt{i}@example.net\r\nSubject: job {i}\r\n"
                           f"Message-ID: <job-{i}@example.org>\r\n\r\n{body}\r\n")
                f.write(json.dumps({"id": f"j{i}", "mail_from": "bench@example.org",
                                    "rcpt_to": [f"rcpt{i}@example.net"], "raw": message}) + "\n")
            else:
                f.write(json.dumps({"id": f"j{i}", "from": "bench@example.org", "to": [f"rcpt{i}@example.net"],
                                    "subject": f"job {i}", "text": body}) + "\n")


def run_dispatcher(port: int, jobs: Path, size: int) -> tuple[float, float, int]:
    """Rate (jobs/s), client CPU s per 1,000 and peak RSS (KiB) of one ``dispatcher run``."""
    config = jobs.with_suffix(".yaml")
    config.write_text(f"smtp:\n  hostname: 127.0.0.1\n  port: {port}\npool:\n  size: {size}\n"
                      "logging:\n  level: warning\n")
    results = jobs.with_suffix(".results.jsonl")
    results.unlink(missing_ok=True)
    launcher = ("import resource, subprocess, sys, time, json; t = time.perf_counter(); "
                "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode; "
                "e = time.perf_counter() - t; u = resource.getrusage(resource.RUSAGE_CHILDREN); "
                "print(json.dumps({'rc': rc, 'seconds': e, 'cpu': u.ru_utime + u.ru_stime, 'rss': u.ru_maxrss}))")
    out = subprocess.run([PY, "-c", launcher, PY, "-m", "dispatcher.cli", "run", str(jobs), "--config", str(config),
                          "--no-progress"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["rc"] != 0:
        raise RuntimeError(f"dispatcher run failed with {result['rc']}: {out.stderr[-2000:]}")
    lines = sum(1 for _ in results.open())
    return lines / result["seconds"], result["cpu"] / lines * 1000, result["rss"]


def measure(rows: list[Row], reps: int) -> None:
    for rep in range(reps):
        order = rows if rep % 2 == 0 else list(reversed(rows))  # alternate, so drift hits all rows alike
        for row in order:
            rate, cpu = run_client(row.spec)
            row.rates.append(rate)
            row.cpus.append(cpu)
            print(f"  [{rep + 1}/{reps}] {row.group} | {row.label}: {rate:,.0f} msg/s, {cpu:.3f} CPU s/1000",
                  file=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="small counts, one repetition (a smoke run)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--no-install-sink", action="store_true", help="never apt-get install postfix")
    parser.add_argument("--output", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()
    scale = 0.1 if args.quick else 1.0
    reps = 1 if args.quick else args.reps

    def n(count: int) -> int:
        return max(20, int(count * scale))

    started = time.monotonic()
    rows: list[Row] = []
    with sink(install=not args.no_install_sink) as (port, sink_name):
        print(f"sink: {sink_name} on 127.0.0.1:{port}", file=sys.stderr)
        base = {"port": port}
        loopback: list[Row] = []
        for loop in ("uvloop", "asyncio"):
            for size in (1, 4, 16):
                command_count = n(6000 if size == 1 else 12000)
                loopback.append(Row("loopback", f"minimal aiosmtplib pool, {size} conn, {loop}",
                                    {**base, "kind": "minimal", "size": size, "loop": loop, "count": command_count}))
                loopback.append(Row("loopback", f"SMTPPool command-by-command, {size} conn, {loop}",
                                    {**base, "kind": "pool", "size": size, "loop": loop, "pipelining": "off",
                                     "count": command_count}))
                loopback.append(Row("loopback", f"SMTPPool pipelined, {size} conn, {loop}",
                                    {**base, "kind": "pool", "size": size, "loop": loop, "pipelining": "on",
                                     "count": n(30000)}))
        loopback.append(Row("loopback", "naive aiosmtplib.send per message, 8 at once, uvloop",
                            {**base, "kind": "naive", "size": 8, "loop": "uvloop", "count": n(2000)}))
        loopback.append(Row("loopback", "SMTPPool pipelined, 4 conn, uvloop, 10 recipients",
                            {**base, "kind": "pool", "size": 4, "loop": "uvloop", "recipients": 10,
                             "count": n(10000)}))
        loopback.append(Row("loopback", "minimal aiosmtplib pool, 4 conn, uvloop, 10 recipients",
                            {**base, "kind": "minimal", "size": 4, "loop": "uvloop", "recipients": 10,
                             "count": n(3000)}))
        loopback.append(Row("loopback", "SMTPPool pipelined, 4 conn, uvloop, 1 MB attachment",
                            {**base, "kind": "pool", "size": 4, "loop": "uvloop", "attachment_bytes": 1_000_000,
                             "count": n(200)}))
        loopback.append(Row("loopback", "minimal aiosmtplib pool, 4 conn, uvloop, 1 MB attachment",
                            {**base, "kind": "minimal", "size": 4, "loop": "uvloop", "attachment_bytes": 1_000_000,
                             "count": n(200)}))
        print("loopback rows", file=sys.stderr)
        measure(loopback, reps)
        rows += loopback

        source = Row("loopback", "Postfix smtp-source, 4 sessions (C reference)", {})
        for _ in range(reps):
            measured = run_smtp_source(port, n(20000), 4)
            if measured:
                source.rates.append(measured[0])
                source.cpus.append(measured[1])
        if source.rates:
            rows.append(source)

        print("dispatcher run rows", file=sys.stderr)
        with tempfile.TemporaryDirectory() as tmp:
            for raw in (True, False):
                jobs = Path(tmp) / f"jobs-{'raw' if raw else 'composed'}.jsonl"
                write_jobs(jobs, n(30000), raw)
                row = Row("batch", f"dispatcher run, {'raw' if raw else 'composed'} jobs, 4 conn, uvloop", {})
                for _ in range(reps):
                    rate, cpu, _rss = run_dispatcher(port, jobs, 4)
                    row.rates.append(rate)
                    row.cpus.append(cpu)
                rows.append(row)
            if not args.skip_memory:
                print("memory rows", file=sys.stderr)
                for count in (100_000, 1_000_000):
                    count = n(count)
                    jobs = Path(tmp) / f"mem-{count}.jsonl"
                    write_jobs(jobs, count, raw=True)
                    rate, cpu, rss = run_dispatcher(port, jobs, 4)
                    jobs.unlink()
                    row = Row("memory", f"dispatcher run, {count:,} raw jobs: peak RSS {rss / 1024:.1f} MiB", {})
                    row.rates.append(rate)
                    row.cpus.append(cpu)
                    row.note = f"{rss / 1024:.1f}"
                    rows.append(row)

        print("2 ms RTT rows", file=sys.stderr)
        with delay_proxy(port, 1.0) as proxied:
            distant: list[Row] = []
            for size in (1, 8, 32):
                per_conn = {"minimal": 100, "off": 100, "on": 400}
                distant.append(Row("rtt2ms", f"minimal aiosmtplib pool, {size} conn",
                                   {"port": proxied, "kind": "minimal", "size": size, "loop": "uvloop",
                                    "count": n(per_conn["minimal"] * size * 2)}))
                for mode in ("off", "on"):
                    label = "pipelined" if mode == "on" else "command-by-command"
                    distant.append(Row("rtt2ms", f"SMTPPool {label}, {size} conn",
                                       {"port": proxied, "kind": "pool", "size": size, "loop": "uvloop",
                                        "pipelining": mode, "count": n(per_conn[mode] * size * 2)}))
            measure(distant, reps)
            rows += distant

    report = render(rows, sink_name, reps, time.monotonic() - started, args.quick)
    print(report)
    args.output.write_text(report)
    print(f"written to {args.output}", file=sys.stderr)


def _find(rows: list[Row], group: str, label: str) -> Row | None:
    return next((r for r in rows if r.group == group and r.label == label), None)


def _ratio(a: Row | None, b: Row | None) -> float | None:
    if a is None or b is None or not a.rates or not b.rates:
        return None
    return a.median() / b.median()


def render(rows: list[Row], sink_name: str, reps: int, elapsed: float, quick: bool) -> str:
    cpu_model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = [
        f"# Benchmark results — {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "",
        f"Machine: {cpu_model}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}. Sink: {sink_name} on 127.0.0.1 "
        f"(its own process). Messages ~2 KB, one recipient unless said. "
        f"Median of {reps} run(s) (min–max); CPU is the client process only. Total {elapsed:.0f} s."
        + (" **Quick run: small counts, not for comparison.**" if quick else ""),
        "",
        "Reproduce: `./dev python -m benchmarks` (`--quick` for a smoke run).",
        "",
    ]
    titles = {"loopback": "Loopback", "batch": "`dispatcher run` end to end (results file written)",
              "memory": "Memory of `dispatcher run`", "rtt2ms": "Relay at 2 ms RTT (delaying proxy, 1 ms each way)"}
    for group, title in titles.items():
        group_rows = [r for r in rows if r.group == group]
        if not group_rows:
            continue
        out += [f"## {title}", "", "| client | msg/s median (min–max) | client CPU s / 1,000 msgs |", "|---|---:|---:|"]
        out += [f"| {r.label} | {r.cell()} | {r.cpu_cell()} |" for r in group_rows]
        out.append("")
    out += ["## Targets", "", "| target | measured | verdict |", "|---|---:|---|"]

    def verdict(name: str, value: float | None, goal: float, fmt: str = "{:.2f}×", higher: bool = True) -> None:
        if value is None:
            out.append(f"| {name} | n/a | not measured |")
            return
        ok = value >= goal if higher else value <= goal
        out.append(f"| {name} | {fmt.format(value)} | {'PASS' if ok else 'MISS'} |")

    for loop in ("uvloop", "asyncio"):
        for size in (1, 4, 16):
            minimal = _find(rows, "loopback", f"minimal aiosmtplib pool, {size} conn, {loop}")
            verdict(f"SMTPPool command-by-command ≥ 0.95× minimal pool, {size} conn, {loop}",
                    _ratio(_find(rows, "loopback", f"SMTPPool command-by-command, {size} conn, {loop}"), minimal), 0.95)
    naive = _find(rows, "loopback", "naive aiosmtplib.send per message, 8 at once, uvloop")
    verdict("SMTPPool 16 conn uvloop (command-by-command) ≥ 4.5× naive send",
            _ratio(_find(rows, "loopback", "SMTPPool command-by-command, 16 conn, uvloop"), naive), 4.5)
    verdict("SMTPPool 16 conn uvloop (pipelined) ≥ 4.5× naive send",
            _ratio(_find(rows, "loopback", "SMTPPool pipelined, 16 conn, uvloop"), naive), 4.5)
    library = _find(rows, "loopback", "SMTPPool pipelined, 4 conn, uvloop")
    verdict("dispatcher run (raw jobs) ≥ 0.8× library rate, 4 conn",
            _ratio(_find(rows, "batch", "dispatcher run, raw jobs, 4 conn, uvloop"), library), 0.8)
    verdict("dispatcher run (composed jobs) ≥ 0.8× library rate, 4 conn",
            _ratio(_find(rows, "batch", "dispatcher run, composed jobs, 4 conn, uvloop"), library), 0.8)
    memory = [r for r in rows if r.group == "memory"]
    if len(memory) == 2:
        verdict("peak RSS 1M jobs − 100k jobs ≤ 30 MiB", float(memory[1].note) - float(memory[0].note), 30.0,
                "{:.1f} MiB", higher=False)
    for mode in ("command-by-command", "pipelined"):
        one = _find(rows, "rtt2ms", f"SMTPPool {mode}, 1 conn")
        verdict(f"2 ms RTT, {mode}: 32 conn ≥ 20× 1 conn", _ratio(_find(rows, "rtt2ms", f"SMTPPool {mode}, 32 conn"), one), 20)
    minimal1 = _find(rows, "loopback", "minimal aiosmtplib pool, 1 conn, uvloop")
    verdict("pipelined, 1 conn ≥ 4× minimal pool 1 conn (uvloop)",
            _ratio(_find(rows, "loopback", "SMTPPool pipelined, 1 conn, uvloop"), minimal1), 4.0)
    four = _find(rows, "loopback", "SMTPPool pipelined, 4 conn, uvloop")
    verdict("pipelined, 4 conn ≥ 20,000 msg/s", four.median() if four and four.rates else None, 20000, "{:,.0f} msg/s")
    verdict("pipelined, 4 conn client CPU ≤ 0.06 s / 1,000",
            statistics.median(four.cpus) if four and four.cpus else None, 0.06, "{:.3f} s", higher=False)
    source = _find(rows, "loopback", "Postfix smtp-source, 4 sessions (C reference)")
    verdict("pipelined, 4 conn ≥ Postfix smtp-source 4 sessions", _ratio(four, source), 1.0)
    rtt_one = _find(rows, "rtt2ms", "SMTPPool pipelined, 1 conn")
    verdict("2 ms RTT, pipelined, 1 conn ≥ 350 msg/s", rtt_one.median() if rtt_one and rtt_one.rates else None,
            350, "{:,.0f} msg/s")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    main()
