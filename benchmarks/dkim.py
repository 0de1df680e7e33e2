"""DKIM where users sign: a templated campaign signed with rsa-2048 and ed25519.

    ./dev python -m benchmarks.dkim [--jobs 20000] [--rounds 3] [--processes N] [--profile]

`dispatcher run` on one jobs file of templated jobs with unsubscribe headers (the
campaign shape of the README) against one smtp-sink: unsigned, signed with a
2048-bit RSA key, signed with an Ed25519 key, and the RSA row again with one compose
process (``jobs.compose_processes: 1``, what every signed run had before). In every round the same
machine's one-core rate of the signature alone is measured too: `cryptography`
signing SHA-256 digests with the same RSA key (and the same Ed25519 key) in a fresh
process for about two seconds. Rows are alternated round by round, so a busy
neighbour hits them all alike; ratios are taken within a round, then the median.

The targets (issue 20): rsa-2048 jobs/s >= 1.25x one core's RSA-2048 signatures/s,
ed25519 jobs/s >= 0.8x the unsigned row.

``--profile`` also runs the compose stage of each signed row in this process under
cProfile (what a compose process does with a line: parse, render, build, sign,
prepare) and prints where a job's time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import messages
from benchmarks.runner import run_dispatcher, write_config
from benchmarks.sinks import start_sink

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("unsigned", "rsa-2048", "ed25519", "rsa-2048, 1 compose process")
RSA_TARGET = 1.25
ED25519_TARGET = 0.8

_SIGN_RATE = """
import json, sys, time
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, utils
key = serialization.load_pem_private_key(open(sys.argv[1], "rb").read(), password=None)
seconds = float(sys.argv[2])
digest = bytes(range(32))
if isinstance(key, ed25519.Ed25519PrivateKey):
    sign = key.sign
else:
    pad, alg = padding.PKCS1v15(), utils.Prehashed(hashes.SHA256())
    sign = lambda d: key.sign(d, pad, alg)
count = 0
start, cpu = time.perf_counter(), time.process_time()
while time.perf_counter() - start < seconds:
    for _ in range(50):
        sign(digest)
    count += 50
print(json.dumps({"count": count, "wall": time.perf_counter() - start, "cpu": time.process_time() - cpu}))
"""


def write_ed25519_key(path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key = ed25519.Ed25519PrivateKey.generate()
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def sign_rate(key: Path, seconds: float) -> dict[str, Any]:
    """One core's signatures a second with ``key``, in a fresh process (wall clock)."""
    done = subprocess.run([sys.executable, "-c", _SIGN_RATE, str(key), str(seconds)], capture_output=True,
                          text=True, timeout=seconds + 60, check=False)
    if done.returncode != 0:
        return {"error": done.stderr.strip()[-200:]}
    result: dict[str, Any] = json.loads(done.stdout)
    result["rate"] = result["count"] / result["wall"]
    return result


def config_for(row: str, path: Path, port: int, work: Path, templates: Path, processes: int | None) -> Path:
    write_config(path, port, 4, "default")
    if row.endswith(", 1 compose process"):
        row, processes = row.split(",")[0], 1
    with path.open("a") as out:
        out.write(f"templates:\n  dir: {templates}\njobs:\n  default_from: {messages.SENDER}\n")
        if processes is not None:
            out.write(f"  compose_processes: {processes}\n")
        out.write("unsubscribe:\n  url: https://example.org/u/{{ id }}\n  mailto: u@example.org\n")
        if row != "unsigned":
            key, algorithm = ((work / "rsa.pem", "rsa-sha256") if row == "rsa-2048"
                              else (work / "ed25519.pem", "ed25519-sha256"))
            out.write(f"dkim:\n  domain: example.org\n  selector: bench\n  private_key: {key}\n"
                      f"  algorithm: {algorithm}\n")
    return path


def profile(row: str, jobs: Path, config: Path, count: int, top: int = 18) -> tuple[float, str]:
    """(µs of CPU per job, cProfile) of the compose stage on ``count`` lines, in this
    process: what a compose process does with each line."""
    from dispatcher.compose.jobs import LineSplitter
    from dispatcher.compose.process import _encode
    from dispatcher.compose.stage import Composer
    from dispatcher.config import load_settings

    settings = load_settings(config)
    composer = Composer(settings, base_dir=jobs.parent, attachments_root=jobs.parent, batch=str(jobs))
    splitter = LineSplitter()
    lines = []
    with jobs.open("rb") as source:
        while len(lines) < count:
            chunk = source.read(1 << 18)
            lines.extend(splitter.feed(chunk) if chunk else splitter.end())
            if not chunk:
                break
    lines = lines[:count]

    def compose() -> None:
        for line in lines:
            _encode(line.number, line.size, composer.compose(line))

    compose()  # warm: templates compiled, caches filled
    cpu = time.process_time()
    compose()
    per_job = (time.process_time() - cpu) / len(lines) * 1e6
    profiler = cProfile.Profile()
    profiler.runcall(compose)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    body = "\n".join(line for line in text.getvalue().splitlines() if line.strip())
    return per_job, f"### compose stage, {row}: {per_job:.0f} µs CPU per job without the profiler\n\n```\n{body}\n```\n"


def compose_rate(jobs: Path, config: Path, processes: int) -> float:
    """Jobs a second through ``ComposeProcess`` alone (no SMTP, no results): the
    compose stage's own ceiling with ``processes`` children, the parent only decoding."""
    import asyncio

    from dispatcher.batch.journal import Journal
    from dispatcher.compose.process import ComposeProcess
    from dispatcher.compose.stage import Composer
    from dispatcher.config import load_settings

    settings = load_settings(config)
    composer = Composer(settings, base_dir=jobs.parent, attachments_root=jobs.parent, batch=str(jobs))
    results = jobs.parent / "compose-only.results.jsonl"
    results.unlink(missing_ok=True)
    journal = Journal(results)
    journal.open()

    async def drain() -> int:
        composing = ComposeProcess(composer, os.open(jobs, os.O_RDONLY), journal, processes=processes)
        loop = asyncio.get_running_loop()
        done = 0
        try:
            async for _, batch in composing.outcomes(lambda n: loop.run_in_executor(None, os.read,
                                                                                    composing.fileno(), n)):
                done += len(batch)
        finally:
            composing.close()
            os.close(composing.fileno())
        return done

    try:
        start = time.perf_counter()
        done = asyncio.run(drain())
        return done / (time.perf_counter() - start)
    finally:
        journal.close()


def micro(jobs: Path, config: Path, repeat: int = 7, number: int = 1000) -> str:
    """µs per message, in this process, on the first templated job built unsigned:
    dkimpy's parse + canonicalise + select + body hash against ``pool.dkim``'s, and
    ``sign_all`` with the row's key beside the signature alone. Best of ``repeat``
    runs of ``number``, alternated."""
    import hashlib
    import timeit

    import dkim  # type: ignore[import-untyped]
    from dkim.canonicalization import Relaxed  # type: ignore[import-untyped]

    from dispatcher.compose.jobs import LineSplitter
    from dispatcher.compose.stage import Composer, Ready
    from dispatcher.config import load_settings
    from pool import dkim as ours

    composer = Composer(load_settings(config), base_dir=jobs.parent, attachments_root=jobs.parent, batch=str(jobs))
    signers, composer.signers = composer.signers, []
    with jobs.open("rb") as source:
        line = LineSplitter().feed(source.readline())[0]
    outcome = composer.compose(line)
    assert isinstance(outcome, Ready)
    message = outcome.outgoing.message
    lowered = [name.lower() for name, _ in ours.parse_message(message)[0]]
    include = [name for name in ours.SIGNED_HEADERS
               for _ in range(lowered.count(name) + (name in ours.OVERSIGNED_HEADERS))]

    def theirs() -> None:
        headers, body = dkim.rfc822_parse(message)
        dkim.select_headers(Relaxed.canonicalize_headers(headers), include)
        hashlib.sha256(Relaxed.canonicalize_body(body)).digest()

    def own() -> None:
        headers, body = ours.parse_message(message)
        ours.relaxed_headers(ours.select_headers(headers, include))
        ours.body_digest(body)

    digest = hashlib.sha256(message).digest()
    cases = {"dkimpy: parse, canonicalise, select, body hash": theirs,
             "pool.dkim: parse, canonicalise, select, body hash": own,
             "pool.dkim.sign_all (prepared)": lambda: ours.sign_all(signers, message, prepared=True),
             "the signature alone (cryptography)": lambda: signers[0]._sign_digest(digest)}
    best = {name: float("inf") for name in cases}
    for _ in range(repeat):
        for name, case in cases.items():
            best[name] = min(best[name], timeit.timeit(case, number=number) / number * 1e6)
    return "\n".join(f"| {name} | {value:.1f} |" for name, value in best.items())


@dataclass
class Measured:
    """Every number of one benchmark run."""

    rates: dict[str, list[float]] = field(default_factory=lambda: {row: [] for row in ROWS})
    cpu: dict[str, list[float]] = field(default_factory=lambda: {row: [] for row in ROWS})
    sign: dict[str, list[float]] = field(default_factory=lambda: {"rsa": [], "ed25519": []})
    sign_cpu: dict[str, list[float]] = field(default_factory=lambda: {"rsa": [], "ed25519": []})
    ratios: dict[str, list[float]] = field(default_factory=lambda: {"rsa": [], "ed25519": []})
    errors: list[str] = field(default_factory=list)
    profiles: list[str] = field(default_factory=list)
    compose_cpu: dict[str, float] = field(default_factory=dict)
    compose_only: dict[int, list[float]] = field(default_factory=dict)
    micro: dict[str, str] = field(default_factory=dict)

    def one_round(self, index: int, work: Path, jobs: Path, configs: dict[str, Path], args: argparse.Namespace) -> None:
        """The signing rates, then every row (alternated), then this round's ratios."""
        got: dict[str, float] = {}
        for kind in ("rsa", "ed25519"):
            measured = sign_rate(work / f"{kind}.pem", args.seconds)
            if "error" in measured:
                self.errors.append(f"{kind} signing rate: {measured['error']}")
                continue
            self.sign[kind].append(measured["rate"])
            self.sign_cpu[kind].append(measured["cpu"] / measured["count"] * 1e6)
            got[f"sign-{kind}"] = measured["rate"]
            print(f"round {index + 1}: cryptography {kind} {measured['rate']:,.0f} signatures/s", file=sys.stderr)
        for row in ROWS if index % 2 == 0 else tuple(reversed(ROWS)):
            outcome = run_dispatcher(jobs, configs[row], work / "results.jsonl", args.jobs, deadline=600)
            if outcome.get("error") or not outcome.get("wall"):
                self.errors.append(f"{row}: {outcome.get('error')}")
                continue
            got[row] = outcome["sent"] / outcome["wall"]
            self.rates[row].append(got[row])
            self.cpu[row].append(outcome["cpu"] / outcome["sent"] * 1e6)
            print(f"round {index + 1}: {row} {got[row]:,.0f} jobs/s", file=sys.stderr)
        if "rsa-2048" in got and "sign-rsa" in got:
            self.ratios["rsa"].append(got["rsa-2048"] / got["sign-rsa"])
        if "ed25519" in got and "unsigned" in got:
            self.ratios["ed25519"].append(got["ed25519"] / got["unsigned"])

    def extras(self, jobs: Path, configs: dict[str, Path], args: argparse.Namespace) -> None:
        """``--compose-only`` and ``--profile``."""
        if args.compose_only:
            from dispatcher.compose.process import cores

            for index in range(args.rounds):
                for processes in (1, cores()) if index % 2 == 0 else (cores(), 1):
                    rate = compose_rate(jobs, configs["rsa-2048"], processes)
                    self.compose_only.setdefault(processes, []).append(rate)
                    print(f"compose only, rsa-2048, {processes} processes: {rate:,.0f} jobs/s", file=sys.stderr)
        if args.micro:
            for row in ("ed25519", "rsa-2048"):
                self.micro[row] = micro(jobs, configs[row])
        if args.profile:
            for row in ("unsigned", "rsa-2048", "ed25519"):
                self.compose_cpu[row], text = profile(row, jobs, configs[row], min(args.jobs, 3000))
                if row != "unsigned":
                    self.profiles.append(text)

    def report(self) -> None:
        print("| row | jobs/s (median) | min–max | CPU µs per job (all processes) or signature |")
        print("|---|---|---|---|")
        for row in ROWS:
            if self.rates[row]:
                print(f"| dispatcher run, {row} | {statistics.median(self.rates[row]):,.0f} | "
                      f"{min(self.rates[row]):,.0f}–{max(self.rates[row]):,.0f} | "
                      f"{statistics.median(self.cpu[row]):.0f} |")
        for kind, name in (("rsa", "RSA-2048"), ("ed25519", "Ed25519")):
            if self.sign[kind]:
                print(f"| `cryptography` {name} signatures/s, one core | {statistics.median(self.sign[kind]):,.0f} | "
                      f"{min(self.sign[kind]):,.0f}–{max(self.sign[kind]):,.0f} | "
                      f"{statistics.median(self.sign_cpu[kind]):.0f} |")
        print()
        print("| target | same-round ratios | median | verdict | ceiling from CPU per job |")
        print("|---|---|---|---|---|")
        for kind, name, target in (("rsa", "rsa-2048 jobs/s ÷ one core's RSA-2048 signatures/s", RSA_TARGET),
                                   ("ed25519", "ed25519 jobs/s ÷ unsigned jobs/s", ED25519_TARGET)):
            if self.ratios[kind]:
                median = statistics.median(self.ratios[kind])
                shown = ", ".join(f"{r:.2f}" for r in self.ratios[kind])
                print(f"| {name} ≥ {target} | {shown} | {median:.2f}× | {'met' if median >= target else 'missed'} "
                      f"| {self.ceiling(kind)} |")
        self.report_extras()

    def ceiling(self, kind: str) -> str:
        """What the CPU per job allows: with every core ours, rsa-2048 jobs/s ÷ one
        core's signatures/s ≤ cores × (µs per signature ÷ µs per job); ed25519 ÷
        unsigned ≤ µs per unsigned job ÷ µs per ed25519 job."""
        if kind == "rsa" and self.cpu["rsa-2048"] and self.sign_cpu["rsa"]:
            per_job, per_signature = statistics.median(self.cpu["rsa-2048"]), statistics.median(self.sign_cpu["rsa"])
            cores = os.cpu_count() or 1
            return (f"{cores * per_signature / per_job:.2f}× on {cores} idle cores (needs ≤ "
                    f"{cores * per_signature / RSA_TARGET:.0f} µs per job)")
        if kind == "ed25519" and self.cpu["ed25519"] and self.cpu["unsigned"]:
            signed, unsigned = statistics.median(self.cpu["ed25519"]), statistics.median(self.cpu["unsigned"])
            return f"{unsigned / signed:.2f}× when CPU-bound (needs ≤ {unsigned / ED25519_TARGET:.0f} µs per job)"
        return ""

    def report_extras(self) -> None:
        if self.compose_only:
            print()
            print("The compose stage alone (`--compose-only`: `ComposeProcess` drained by a parent that only decodes; "
                  "no SMTP), rsa-2048")
            print()
            print("| compose processes | jobs/s (median) | min–max |")
            print("|---|---|---|")
            for processes, rates in sorted(self.compose_only.items()):
                print(f"| {processes} | {statistics.median(rates):,.0f} | {min(rates):,.0f}–{max(rates):,.0f} |")
        if self.compose_cpu:
            print()
            print("Where a job's CPU goes (µs): the compose stage alone, in one process (`--profile`), and the rest "
                  "of the run's CPU per job (the event loop process: ids, pool, SMTP, results; pickling both ways)")
            print()
            print("| row | all processes | compose stage | the rest |")
            print("|---|---|---|---|")
            for row in ("unsigned", "rsa-2048", "ed25519"):
                if self.cpu[row] and row in self.compose_cpu:
                    total = statistics.median(self.cpu[row])
                    print(f"| {row} | {total:.0f} | {self.compose_cpu[row]:.0f} | {total - self.compose_cpu[row]:.0f} |")
        for row, table in self.micro.items():
            print()
            print(f"`--micro`, {row}: µs per message in one process (a 2 KB templated message, best of 7×1000, "
                  "alternated)")
            print()
            print("| what | µs |")
            print("|---|---|")
            print(table)
        for error in self.errors:
            print(f"\nerror: {error}")
        for text in self.profiles:
            print()
            print(text)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.dkim", description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per dispatcher run")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=2.0, help="length of each signing-rate measurement")
    parser.add_argument("--processes", type=int, help="jobs.compose_processes for every row (default: the "
                                                      "dispatcher's own choice)")
    parser.add_argument("--sink", default="smtp-sink", choices=["auto", "smtp-sink", "aiosmtpd"])
    parser.add_argument("--profile", action="store_true", help="also profile the compose stage of the signed rows")
    parser.add_argument("--micro", action="store_true",
                        help="also time dkimpy's canonicalisation against pool.dkim's, and sign_all, in this process")
    parser.add_argument("--compose-only", action="store_true",
                        help="also the compose stage alone (no SMTP) with 1 and with one process per core, rsa-2048")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    measured = Measured()
    with tempfile.TemporaryDirectory(prefix="bench-dkim-") as tmp:
        work = Path(tmp)
        jobs, templates = messages.write_templated_jobs(work / "campaign", args.jobs)
        messages.write_dkim_key(work / "rsa.pem")
        write_ed25519_key(work / "ed25519.pem")
        sink = start_sink(args.sink, log=lambda *_: None)
        try:
            configs = {row: config_for(row, work / f"row{i}.yaml", sink.port, work, templates, args.processes)
                       for i, row in enumerate(ROWS)}
            for index in range(args.rounds):
                measured.one_round(index, work, jobs, configs, args)
            measured.extras(jobs, configs, args)
        finally:
            sink.stop()
    print(f"`dispatcher run` on {args.jobs:,} templated jobs with unsubscribe headers (~2 KB text), 4 connections, "
          f"{sink.description}; {args.rounds} rounds alternated; compose processes: "
          f"{args.processes if args.processes is not None else 'default'}; {os.cpu_count()} cores; load average "
          f"before {load_before}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    measured.report()
    return 1 if measured.errors else 0


if __name__ == "__main__":
    sys.exit(main())
