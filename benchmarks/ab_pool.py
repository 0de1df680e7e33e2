"""The library alone at two commits, alternated on one sink, beside ``smtp-source -s 4``.

    ./dev python -m benchmarks.ab_pool BEFORE AFTER [--count 12000] [--runs 5] [--size 4]

Each revision's ``pool`` is taken with ``git archive`` into a temporary directory,
next to a copy of this checkout's ``benchmarks`` (the client is the same for both), and
every run is a fresh ``python -m benchmarks.client --impl pool`` process with that
directory first on ``sys.path``: ``SMTPPool`` pipelined, ``--size`` connections, 64
tasks submitting a 2 KB message to one recipient. Postfix's ``smtp-source -d -s SIZE``
runs in the same alternation when installed, so each round gives a same-run ratio
(library rate / smtp-source rate) that load on the shared machine hits alike.

Printed per revision: msg/s (median, min-max), the median of the per-round ratios to
smtp-source, and the client's CPU µs per message (``time.process_time()`` from
importing ``pool`` to closing the pool: the loop process's own cost; each checkout is
byte-compiled once first, as an installed package is). The load average is
printed before and after.
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
from typing import Any

from benchmarks import messages
from benchmarks.sinks import find_tool, start_sink

ROOT = Path(__file__).resolve().parent.parent
_CLIENT_FILES = ("__init__.py", "client.py", "messages.py", "minimal_pool.py")


def checkout(revision: str, into: Path) -> Path:
    """``pool`` at ``revision`` and this checkout's client, in ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", revision, "pool"], cwd=ROOT, check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "benchmarks").mkdir()
    for name in _CLIENT_FILES:
        shutil.copy(ROOT / "benchmarks" / name, into / "benchmarks" / name)
    # Bytecode once, as an installed package has it (pip compiles on install): else every
    # run compiles the revision's source again inside the timed CPU, and a revision with
    # more lines of library pays for its size, not for its messages.
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(into / "pool")], check=True, capture_output=True)
    found = subprocess.run([sys.executable, "-c", "import pool; print(pool.__file__)"], cwd=into,
                           env=_env(into), check=True, capture_output=True, text=True).stdout.strip()
    if not found.startswith(str(into)):
        raise RuntimeError(f"{revision}: pool imported from {found}, not from the checkout")
    return into


def _env(tree: Path) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(tree), "PYTHONDONTWRITEBYTECODE": "1"}


def run_pool(tree: Path, port: int, count: int, size: int, extra: list[str]) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.client", "--impl", "pool", "--port", str(port), "--size", str(size),
               "--count", str(count), "--pipelining", "on", *extra]
    done = subprocess.run(command, cwd=tree, env=_env(tree), capture_output=True, text=True, timeout=600)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            if result["sent"] != count:
                raise RuntimeError(f"{tree.name}: {result['sent']} of {count} sent: {result['error']}")
            return result
    raise RuntimeError(f"{tree.name}: exit {done.returncode}: {done.stderr.strip()[-500:]}")


def run_source(port: int, count: int, size: int, message_file: Path) -> dict[str, Any]:
    binary = find_tool("smtp-source")
    assert binary is not None
    command = [binary, "-d", "-s", str(size), "-m", str(count), "-F", str(message_file), "-f", messages.SENDER,
               "-t", "user1@example.net", f"127.0.0.1:{port}"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    assert process.stderr is not None
    error = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"smtp-source: {error.strip()[-300:]}")
    return {"sent": count, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime}


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab_pool", description=__doc__.split("\n")[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--count", type=int, default=12_000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=4, help="connections (and smtp-source sessions)")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--sink", default="smtp-sink", choices=["auto", "smtp-sink", "aiosmtpd"])
    parser.add_argument("--no-source", action="store_true", help="leave smtp-source out")
    args = parser.parse_args(argv)
    load_before = load()
    source = not args.no_source and find_tool("smtp-source") is not None
    with tempfile.TemporaryDirectory(prefix="ab-pool-") as tmp:
        work = Path(tmp)
        trees = {"before": checkout(args.before, work / "before"), "after": checkout(args.after, work / "after")}
        raw, _ = messages.build()
        message_file = work / "message.txt"
        message_file.write_bytes(raw.replace(b"\r\n", b"\n"))  # smtp-source adds the CRs and dot-stuffs
        sink = start_sink(args.sink, log=lambda *_: None)
        rounds: list[dict[str, dict[str, Any]]] = []
        try:
            for index in range(args.runs):
                # Alternate the order too: neither revision always runs right after smtp-source.
                order = list(trees) if index % 2 == 0 else list(reversed(trees))
                measured: dict[str, dict[str, Any]] = {}
                for name in order:
                    measured[name] = run_pool(trees[name], sink.port, args.count, args.size, ["--loop", args.loop])
                if source:
                    measured["smtp-source"] = run_source(sink.port, args.count, args.size, message_file)
                rounds.append(measured)
                print(f"round {index + 1}: " + ", ".join(
                    f"{name} {args.count / m['wall']:,.0f}/s" for name, m in measured.items()), file=sys.stderr)
        finally:
            sink.stop()
    print(f"sink: {sink.description}; {args.count:,} messages of {len(raw):,} bytes a run, {args.size} connections, "
          f"{args.loop}; {args.runs} rounds alternated; before {args.before}, after {args.after}")
    print(f"load average before {load_before}, after {load()}")
    ratio_head = " | ratio to smtp-source (median of rounds)" if source else ""
    print(f"| revision | msg/s (median) | min–max{ratio_head} | client CPU µs per message |")
    print("|---|---|---|" + ("---|" if source else "") + "---|")
    names = [*trees, *(["smtp-source"] if source else [])]
    for name in names:
        rates = [args.count / r[name]["wall"] for r in rounds]
        cpu = statistics.median(r[name]["cpu"] / args.count * 1e6 for r in rounds)
        ratio = ""
        if source:
            ratio = f" | {statistics.median(r['smtp-source']['wall'] / r[name]['wall'] for r in rounds):.2f}x"
        label = {"before": f"before ({args.before})", "after": f"after ({args.after})"}.get(
            name, f"smtp-source -d -s {args.size}")
        print(f"| {label} | {statistics.median(rates):,.0f} | {min(rates):,.0f}–{max(rates):,.0f}{ratio} | {cpu:.1f} |")
    ratios = [r["before"]["wall"] / r["after"]["wall"] for r in rounds]
    print(f"after/before, per round: {', '.join(f'{x:.2f}' for x in ratios)}; median {statistics.median(ratios):.2f}x")


if __name__ == "__main__":
    main()
