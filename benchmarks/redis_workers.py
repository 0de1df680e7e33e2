"""Redis Stream workers vs ``dispatcher run``: the same jobs, the same sink, the same run.

    ./dev python -m benchmarks.redis_workers [--jobs 20000] [--rounds 3] [--size 4]

Each round runs ``dispatcher run JOBS``, then for 1 and 2 workers: a fresh Redis
(AOF on, ``appendfsync always``, as the README recommends), ``dispatcher enqueue``
(timed apart), and the workers with ``--until-empty``, timed from their start to the
last one's exit (process start-up included, as for ``run``). Prints the median jobs/s
of each and the ratio to ``run`` (issue 10's target: 1 worker >= 0.7x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import messages, sinks

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
DISPATCHER = [sys.executable, "-m", "dispatcher.cli"]


def _redis(directory: Path, port: int) -> subprocess.Popen[bytes]:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--appendonly", "yes",
         "--appendfsync", "always", "--save", "", "--logfile", ""],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert process.stdout is not None
    for line in process.stdout:
        if b"Ready to accept connections" in line:
            process.stdout.close()  # Redis logs little after start; it never blocks on a closed pipe
            return process
    raise SystemExit("redis-server did not start")


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    process.wait(timeout=10)


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([*DISPATCHER, *args], env=ENV, cwd=cwd, capture_output=True, check=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.redis_workers")
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=4, help="pool size (SMTP connections) of run and of each worker")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="redis-bench-"))
    jobs = messages.write_jobs(work / "jobs.jsonl", args.jobs)
    sink = sinks.start_sink("auto", log=lambda text: print(text, file=sys.stderr))
    config = work / "c.yaml"
    config.write_text(f"smtp:\n  hostname: 127.0.0.1\n  port: {sink.port}\npool:\n  size: {args.size}\n"
                      "logging:\n  format: json\n  level: warning\n")
    rates: dict[str, list[float]] = {"dispatcher run": [], "enqueue": [], "1 worker": [], "2 workers": []}
    try:
        for round_ in range(args.rounds):
            (work / "jobs.results.jsonl").unlink(missing_ok=True)
            started = time.monotonic()
            done = _cli("run", str(jobs), "--config", str(config), "--no-progress", cwd=work)
            if done.returncode != 0:
                raise SystemExit(f"dispatcher run failed: {done.stderr.decode()[-1000:]}")
            rates["dispatcher run"].append(args.jobs / (time.monotonic() - started))
            for count in (1, 2):
                port = sinks.free_port()
                redis = _redis(work / f"redis-{round_}-{count}", port)
                url = f"redis://127.0.0.1:{port}/0"
                try:
                    started = time.monotonic()
                    done = _cli("enqueue", str(jobs), "--redis", url, cwd=work)
                    if done.returncode != 0:
                        raise SystemExit(f"enqueue failed: {done.stderr.decode()[-1000:]}")
                    rates["enqueue"].append(args.jobs / (time.monotonic() - started))
                    started = time.monotonic()
                    workers = [subprocess.Popen([*DISPATCHER, "worker", "--redis", url, "--config", str(config),
                                                 "--until-empty"], env=ENV, cwd=work,
                                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                               for _ in range(count)]
                    if any(worker.wait() != 0 for worker in workers):
                        raise SystemExit("a worker failed")
                    elapsed = time.monotonic() - started
                    status = json.loads(_cli("status", "--redis", url, "--json", cwd=work).stdout)
                    if status["done"]["sent"] != args.jobs:
                        raise SystemExit(f"workers sent {status['done']['sent']} of {args.jobs}")
                    rates["1 worker" if count == 1 else "2 workers"].append(args.jobs / elapsed)
                finally:
                    _stop(redis)
            print(f"round {round_ + 1}: " + ", ".join(f"{k} {v[-1]:.0f}/s" for k, v in rates.items()),
                  file=sys.stderr)
    finally:
        sink.stop()
        shutil.rmtree(work, ignore_errors=True)
    run = statistics.median(rates["dispatcher run"])
    print(f"{args.jobs:,} composed jobs, pool size {args.size}, {sink.description}, {os.cpu_count()} cores, "
          f"median of {args.rounds} rounds\n")
    print("| | jobs/s | × dispatcher run |\n|---|---:|---:|")
    for name, values in rates.items():
        rate = statistics.median(values)
        print(f"| {name} | {rate:,.0f} | {rate / run:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
