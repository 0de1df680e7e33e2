"""What a large suppression list costs ``dispatcher run``.

    ./dev python -m benchmarks.suppression [--jobs 50000] [--listed 100000] [--runs 3]

The same jobs file (one distinct recipient per job) is sent to the same sink by
``dispatcher run``, alternating: with an empty suppression list, and with ``--listed``
addresses on it (none of them a recipient of the batch, so both runs send every job
and only the cost of the list differs: loading it, and one lookup per recipient).
Prints the median jobs/s of each and their ratio; the target is >= 0.90.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from benchmarks.runner import run_dispatcher, write_config
from benchmarks.sinks import start_sink
from dispatcher.loop.suppression import Reason, Record, SuppressionStore


def write_jobs(path: Path, count: int) -> Path:
    text = "Hello,\n\n" + "A line of text for the benchmark message body.\n" * 30
    tail = json.dumps({"from": "news@example.org", "subject": "Benchmark job", "text": text})[1:]
    with path.open("w", encoding="ascii") as out:
        for start in range(0, count, 10_000):
            out.write("".join(f'{{"id": "job-{i}", "to": ["user{i}@example.net"], {tail}\n'
                              for i in range(start, min(count, start + 10_000))))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=50_000)
    parser.add_argument("--listed", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sink", default="auto", choices=("auto", "smtp-sink", "aiosmtpd"))
    args = parser.parse_args()
    sink = start_sink(args.sink)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            jobs = write_jobs(work / "jobs.jsonl", args.jobs)
            empty, full = work / "empty", work / "full"
            empty.mkdir()
            full.mkdir()
            store = SuppressionStore(full / "suppressions.sqlite")
            store.add(Record(f"gone{i}@example.org", Reason.HARD_BOUNCE, "benchmark") for i in range(args.listed))
            store.close()
            rates: dict[str, list[float]] = {"empty": [], "full": []}
            cpus: dict[str, list[float]] = {"empty": [], "full": []}
            for run in range(args.runs):
                for name, where in (("empty", empty), ("full", full)) if run % 2 == 0 else (("full", full),
                                                                                          ("empty", empty)):
                    config = write_config(where / "c.yaml", sink.port, 4, "auto")
                    config.write_text(config.read_text() + f"suppression:\n  path: {where / 'suppressions.sqlite'}\n")
                    outcome = run_dispatcher(jobs, config, where / "results.jsonl", args.jobs, 0)
                    if outcome.get("error"):
                        raise SystemExit(f"{name}: {outcome['error']}")
                    rates[name].append(args.jobs / outcome["wall"])
                    cpus[name].append(outcome["cpu"])
                    print(f"run {run + 1} {name:5}: {args.jobs / outcome['wall']:8.0f} jobs/s "
                          f"(wall {outcome['wall']:.2f} s, cpu {outcome['cpu']:.2f} s)", flush=True)
            a, b = statistics.median(rates["empty"]), statistics.median(rates["full"])
            ca, cb = statistics.median(cpus["empty"]), statistics.median(cpus["full"])
            print()
            print("| dispatcher run, text jobs, 4 connections | jobs/s (median) | CPU s of the run (median) |")
            print("|---|---|---|")
            print(f"| empty suppression list | {a:,.0f} | {ca:.2f} |")
            print(f"| {args.listed:,} suppressed addresses | {b:,.0f} ({b / a:.2f}x; target >= 0.90: "
                  f"{'PASS' if b / a >= 0.90 else 'MISS'}) | {cb:.2f} ({cb / ca - 1:+.1%}) |")
            print(f"\n{args.jobs:,} jobs, {args.runs} runs each, alternated; sink: {sink.description}")
    finally:
        sink.stop()


if __name__ == "__main__":
    main()
