"""``dispatcher run`` at two commits, alternated on the same sink: jobs/s and CPU per job.

    ./dev python -m benchmarks.ab BEFORE AFTER [--jobs 20000] [--runs 3] [--sink auto]

Each revision's ``pool`` and ``dispatcher`` are taken with ``git archive`` into a
temporary directory and run as ``python -m dispatcher.cli run`` with that directory
first on PYTHONPATH, against one sink (Postfix smtp-sink when installed), 4
connections, on the e2e rows' generated jobs: 2 KB text, and the same with a 2 KB html
alternative. Runs alternate revision by revision so that load on the machine hits
both alike. CPU is the child's user+system time (``wait4``), per job.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import messages
from benchmarks.sinks import start_sink

ROOT = Path(__file__).resolve().parent.parent


def checkout(revision: str, into: Path) -> Path:
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision, "pool", "dispatcher"], cwd=ROOT, check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def run_once(tree: Path, jobs: Path, config: Path, workdir: Path, count: int) -> tuple[float, float]:
    """(jobs/s, CPU µs per job) of one ``dispatcher run``; raises if a job was not sent."""
    results = workdir / "results.jsonl"
    results.unlink(missing_ok=True)
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, "-m", "dispatcher.cli", "run", str(jobs), "--config", str(config), "--results", str(results),
         "--no-progress"], cwd=workdir, env={**os.environ, "PYTHONPATH": str(tree)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    assert process.stderr is not None
    error = process.stderr.read().decode(errors="replace")[-500:]
    process.stderr.close()
    rows = results.read_text().splitlines() if results.exists() else []
    sent = sum(json.loads(row).get("status") == "sent" for row in rows)
    if os.waitstatus_to_exitcode(status) != 0 or sent != count:
        raise RuntimeError(f"{tree.name}: {sent} of {count} sent: {error}")
    return count / wall, (usage.ru_utime + usage.ru_stime) / count * 1e6


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sink", default="auto", choices=["auto", "smtp-sink", "aiosmtpd"])
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ab-") as tmp:
        work = Path(tmp)
        trees = {name: checkout(revision, work / name) for name, revision in (("before", args.before),
                                                                             ("after", args.after))}
        files = {"text": messages.write_jobs(work / "text.jsonl", args.jobs),
                 "html+text": messages.write_jobs(work / "html.jsonl", args.jobs, html=True)}
        sink = start_sink(args.sink, log=lambda *_: None)
        try:
            config = work / "config.yaml"
            config.write_text(f"smtp:\n  hostname: 127.0.0.1\n  port: {sink.port}\npool:\n  size: 4\n")
            measured: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.runs):
                for shape, jobs in files.items():
                    for name, tree in trees.items():
                        measured.setdefault((shape, name), []).append(run_once(tree, jobs, config, work, args.jobs))
        finally:
            sink.stop()
    print(f"sink: {sink.description}; {args.jobs:,} jobs a run; before {args.before}, after {args.after}")
    print(f"| jobs | revision | jobs/s (median of {args.runs}) | min–max | CPU µs per job |")
    print("|---|---|---|---|---|")
    for (shape, name), rows in measured.items():
        rates = [rate for rate, _ in rows]
        print(f"| {shape} | {name} | {statistics.median(rates):,.0f} | {min(rates):,.0f}–{max(rates):,.0f} "
              f"| {statistics.median(cpu for _, cpu in rows):.0f} |")


if __name__ == "__main__":
    main()
