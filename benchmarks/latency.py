"""Round trips where users are: a real Postfix smtpd behind the delaying proxy.

    ./dev python -m benchmarks.latency [--rtts 1,20] [--sizes 1,16] [--seconds 4]

A private Postfix (tests/postfixserver.py: its own master, every message handed to
discard(8), so each one is queued by cleanup and logged like real mail; needs root)
behind ``benchmarks.delay_proxy`` at each round trip R. Rows, each a fresh
``benchmarks.client`` process: SMTPPool command by command, DATA-pipelined (RFC 2920,
``pipeline_depth=1``) and BDAT-pipelined (RFC 3030, ``pipeline_depth=8``). Beside each
row: the bound of one DATA transaction per round trip per connection, connections / R.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MODES = {"command": ["--pipelining", "off"], "DATA-pipelined": ["--pipelining", "on", "--pipeline-depth", "1"],
         "BDAT-pipelined": ["--pipelining", "on", "--pipeline-depth", "8"]}
PER_RTT = {"command": 0.22, "DATA-pipelined": 0.9, "BDAT-pipelined": 6.0}  # messages per round trip, a guess


def run(port: int, mode: str, size: int, count: int) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.client", "--impl", "pool", "--port", str(port), "--size", str(size),
               "--count", str(count), "--concurrency", str(max(64, 16 * size)), *MODES[mode]]
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            return result
    return {"sent": 0, "failed": count, "error": done.stderr.strip()[-300:]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.latency", description=__doc__.split("\n")[0])
    parser.add_argument("--rtts", default="1,20", help="round trips in ms, comma-separated")
    parser.add_argument("--sizes", default="1,16", help="connections, comma-separated")
    parser.add_argument("--seconds", type=float, default=4.0, help="about how long one row runs")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--relay-limit", type=float, default=1500,
                        help="msg/s this Postfix takes at most (benchmarks.relay measures it: ~1,350 here); a row "
                             "sends no more than --seconds times this, so that rows the relay bounds stay short")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(ROOT / "tests"))
    from postfixserver import DISCARD_ALL, start_postfix

    from benchmarks.runner import Proxy

    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    postfix = start_postfix(DISCARD_ALL)
    rows: list[tuple[float, float, str, int, list[float]]] = []
    try:
        for rtt in (float(x) for x in args.rtts.split(",")):
            proxy = Proxy(postfix.port, rtt / 2)
            try:
                measured = statistics.median(proxy.measure_rtt(20))
                for size in (int(x) for x in args.sizes.split(",")):
                    for mode in MODES:
                        rates = []
                        for _ in range(args.rounds):
                            count = max(20, int(args.seconds * size * PER_RTT[mode] * 1000 / rtt))
                            count = min(count, int(args.seconds * args.relay_limit), 20_000)
                            result = run(proxy.port, mode, size, count)
                            if result.get("failed") or not result.get("wall"):
                                print(f"{mode} R={rtt} K={size}: {result.get('error')}", file=sys.stderr)
                                continue
                            rates.append(result["sent"] / result["wall"])
                            print(f"R={rtt:g} ms K={size} {mode}: {rates[-1]:,.0f} msg/s", file=sys.stderr)
                        rows.append((rtt, measured, mode, size, rates))
            finally:
                proxy.stop()
    finally:
        postfix.stop()
    print(f"Postfix smtpd {postfix.binary} (private master, discard transport) behind the delaying proxy; "
          f"load average before {load}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("| round trip (NOOP measured) | connections | mode | msg/s | one DATA per round trip: K/R | ÷ K/R |"
          " ÷ DATA-pipelined |")
    print("|---|---|---|---|---|---|---|")
    for rtt, measured, mode, size, rates in rows:
        if not rates:
            print(f"| {rtt:g} ms ({measured:.1f}) | {size} | {mode} | failed | | | |")
            continue
        rate = statistics.median(rates)
        bound = size * 1000 / measured
        data = [statistics.median(r) for t, _, m, k, r in rows if t == rtt and k == size and m == "DATA-pipelined" and r]
        ratio = f"{rate / data[0]:.1f}×" if data and mode != "DATA-pipelined" else ""
        print(f"| {rtt:g} ms ({measured:.1f}) | {size} | {mode} | {rate:,.0f} | {bound:,.0f} | {rate / bound:.2f} "
              f"| {ratio} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
