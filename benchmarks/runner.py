"""``python -m benchmarks``: every row of issue 4 (and issue 5's pipelined rows), one run.

Each measured run is a fresh client process (``benchmarks.client``, or ``dispatcher
run``, or Postfix's ``smtp-source``) sending to one sink process; the delaying proxy is
a third process. Runs of a section are alternated: repetition 1 of every row, then
repetition 2 of every row, and so on, so that drift on the machine hits all rows alike.
"""

from __future__ import annotations

import argparse
import datetime as dt
import inspect
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import messages
from benchmarks.sinks import Sink, find_tool, start_sink

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"


#: Everything from this line on in RESULTS.md is written by hand (analyses, earlier runs,
#: one-off tools): a run of ``python -m benchmarks`` replaces what is above it and keeps it.
KEEP_BELOW = "<!-- Written by hand below this line: python -m benchmarks keeps it. -->"


def write_results(path: Path, text: str) -> None:
    """Write a run's tables to ``path``, keeping the hand-written part of the file."""
    kept = ""
    if path.exists():
        old = path.read_text()
        if KEEP_BELOW in old:
            kept = "\n" + old[old.index(KEEP_BELOW):]
    path.write_text(text.rstrip("\n") + "\n" + kept)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# -- what is measured ---------------------------------------------------------------


@dataclass
class Case:
    """One row of the table: a configuration measured ``runs`` times."""

    section: str
    impl: str  # pool | minimal | naive | smtp-source | dispatcher
    size: int = 1
    loop: str = "uvloop"
    pipelining: str = "-"  # on | off | - (not applicable)
    count: int = 1000
    recipients: int = 1
    attachment: int = 0
    concurrency: int = 64
    label: str = ""
    html: bool = False  # e2e: the jobs have an html alternative (issue 9)
    variant: str = ""  # e2e: "" composed jobs, "templated" (+ unsubscribe headers), "templated+dkim" (issue 11)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def name(self) -> str:
        if self.label:
            return self.label
        names = {"pool": "SMTPPool", "minimal": "minimal pool", "naive": "naive aiosmtplib.send",
                 "smtp-source": "Postfix smtp-source", "dispatcher": "dispatcher run"}
        return names[self.impl]

    def key(self) -> tuple[Any, ...]:
        return (self.section, self.impl, self.size, self.loop, self.pipelining, self.recipients, self.attachment,
                self.html, self.variant)

    def ok_runs(self) -> list[dict[str, Any]]:
        return [r for r in self.runs if r.get("sent", 0) > 0 and not r.get("failed") and not r.get("error")]

    def rates(self) -> list[float]:
        return [r["sent"] / r["wall"] for r in self.ok_runs()]

    def rate(self) -> float | None:
        rates = self.rates()
        return statistics.median(rates) if rates else None

    def cpu_per_1000(self) -> float | None:
        values = [1000 * r["cpu"] / r["sent"] for r in self.ok_runs()]
        return statistics.median(values) if values else None

    def median_of(self, name: str) -> float | None:
        values = [r[name] for r in self.ok_runs() if r.get(name) is not None]
        return statistics.median(values) if values else None

    def problem(self) -> str:
        bad = [r for r in self.runs if r not in self.ok_runs()]
        if not bad:
            return ""
        r = bad[0]
        return r.get("error") or f"{r.get('failed', '?')} failed of {r.get('sent', 0) + r.get('failed', 0)}"


@dataclass
class Settings:
    runs: int
    quick: bool
    pipelining_modes: list[str]  # subset of ["off", "on"]
    scale: float
    memory_jobs: tuple[int, int]
    memory_deadline: float
    e2e_jobs: int
    sections: set[str]


def pool_supports_pipelining() -> bool | None:
    """True/False whether SMTPPool takes ``pipelining=``; None when the pool does not import."""
    try:
        from pool import SMTPPool
    except Exception as exc:  # noqa: BLE001 - reported, the other rows still run
        log(f"pool does not import ({type(exc).__name__}: {exc}): SMTPPool rows skipped")
        return None
    return "pipelining" in inspect.signature(SMTPPool).parameters


def build_cases(cfg: Settings, pipelining: bool | None) -> list[Case]:
    def n(count: int) -> int:
        return max(20, int(count * cfg.scale))

    pool_modes = ([m for m in cfg.pipelining_modes] if pipelining else ["default"]) if pipelining is not None else []
    counts = {"off": 5000, "default": 5000, "on": 15000}
    cases: list[Case] = []
    if "loopback" in cfg.sections:
        for loop in ("uvloop", "asyncio"):
            for size in (1, 4, 16):
                cases.append(Case("loopback", "minimal", size, loop, count=n(5000)))
                for mode in pool_modes:
                    cases.append(Case("loopback", "pool", size, loop, mode, count=n(counts[mode])))
            cases.append(Case("loopback", "naive", 8, loop, count=n(2000), concurrency=8))
        if find_tool("smtp-source"):
            cases.append(Case("loopback", "smtp-source", 4, "-", "-", count=n(20000)))
    if "shapes" in cfg.sections:
        for recipients, attachment, base in ((10, 0, 3000), (1, 1 << 20, 150)):
            cases.append(Case("shapes", "minimal", 4, count=n(base), recipients=recipients, attachment=attachment))
            for mode in pool_modes:
                count = base * (3 if mode == "on" and not attachment else 1)
                cases.append(Case("shapes", "pool", 4, "uvloop", mode, n(count), recipients, attachment))
    if "proxy" in cfg.sections:
        proxy_counts = {(1, False): 250, (8, False): 2000, (32, False): 5000,
                        (1, True): 1200, (8, True): 6000, (32, True): 12000}
        for size in (1, 8, 32):
            concurrency = max(64, 4 * size)
            cases.append(Case("proxy", "minimal", size, count=n(proxy_counts[size, False]), concurrency=concurrency))
            for mode in pool_modes:
                count = proxy_counts[size, mode == "on"]
                cases.append(Case("proxy", "pool", size, "uvloop", mode, n(count), concurrency=concurrency))
    if "e2e" in cfg.sections:
        modes = [m for m in cfg.pipelining_modes] if pipelining else ["default"]
        for mode in modes:
            cases.append(Case("e2e", "dispatcher", 4, "uvloop", mode, cfg.e2e_jobs))
            cases.append(Case("e2e", "dispatcher", 4, "uvloop", mode, cfg.e2e_jobs, html=True,
                              label="dispatcher run, html+text"))
            cases.append(Case("e2e", "dispatcher", 4, "uvloop", mode, cfg.e2e_jobs, variant="templated",
                              label="dispatcher run, templated + unsubscribe"))
            cases.append(Case("e2e", "dispatcher", 4, "uvloop", mode, cfg.e2e_jobs, variant="templated+dkim",
                              label="dispatcher run, templated + unsubscribe + DKIM rsa-2048"))
        # the library at the same settings, alternated with it
        for mode in pool_modes:
            cases.append(Case("e2e", "pool", 4, "uvloop", mode, n(counts[mode]), label="SMTPPool (library)"))
    return cases


# -- running one measurement -----------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _psutil_process(pid: int) -> Any:
    try:
        import psutil

        return psutil.Process(pid)
    except Exception:  # noqa: BLE001 - psutil missing: no RSS curve, peak RSS still comes from wait4
        return None


def rss_slope(points: list[tuple[float, float]]) -> float | None:
    """MB of RSS per 100,000 jobs done, fitted over the second half of the run (after warm-up)."""
    points = [p for p in points if p[0] > 0]
    tail = points[len(points) // 2:]
    if len(tail) < 4 or tail[-1][0] - tail[0][0] < 1000:
        return None
    mean_x = sum(x for x, _ in tail) / len(tail)
    mean_y = sum(y for _, y in tail) / len(tail)
    var = sum((x - mean_x) ** 2 for x, _ in tail)
    cov = sum((x - mean_x) * (y - mean_y) for x, y in tail)
    return 100_000 * cov / var if var else None


def _cpu(pid: int | None) -> float | None:
    if pid is None:
        return None
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    except Exception:  # noqa: BLE001 - psutil missing or process gone: the column stays empty
        return None


def _wait(process: subprocess.Popen[Any], timeout: float) -> tuple[int, Any]:
    """Wait for a child, killing it at ``timeout``; its exit code and resource usage."""
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage
        if time.monotonic() > deadline:
            process.kill()
            _, status, usage = os.wait4(process.pid, 0)
            process.returncode = os.waitstatus_to_exitcode(status)
            return process.returncode, usage
        time.sleep(0.01)


def run_client(case: Case, port: int, timeout: float = 300, extra: list[str] | None = None) -> dict[str, Any]:
    command = [sys.executable, "-m", "benchmarks.client", "--impl", case.impl, "--port", str(port),
               "--size", str(case.size), "--count", str(case.count), "--loop", case.loop,
               "--concurrency", str(case.concurrency), "--recipients", str(case.recipients),
               "--attachment", str(case.attachment)]
    if case.impl == "pool" and case.pipelining in ("on", "off"):
        command += ["--pipelining", case.pipelining]
    command += extra or []
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=out, stderr=err, cwd=ROOT, env=_env())
        code, _ = _wait(process, timeout)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    for line in reversed(stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (stderr.strip().splitlines() or ["no output"])[-1]
    return {"sent": 0, "failed": case.count, "error": f"exit {code}: {tail[:200]}"}


def run_smtp_source(case: Case, port: int, message_file: Path) -> dict[str, Any]:
    binary = find_tool("smtp-source")
    assert binary is not None
    command = [binary, "-d", "-s", str(case.size), "-m", str(case.count), "-F", str(message_file),
               "-f", messages.SENDER, "-t", "user1@example.net", f"127.0.0.1:{port}"]
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    code, usage = _wait(process, 300)
    wall = time.perf_counter() - start
    if code != 0:
        err = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
        return {"sent": 0, "failed": case.count, "error": f"smtp-source exit {code}: {err[:200]}"}
    return {"sent": case.count, "failed": 0, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime}


def _dispatcher_command() -> list[str] | None:
    found = shutil.which("dispatcher") or (str(Path(sys.executable).parent / "dispatcher")
                                           if (Path(sys.executable).parent / "dispatcher").exists() else None)
    return [found] if found else None


def write_config(path: Path, port: int, size: int, pipelining: str) -> Path:
    lines = ["smtp:", "  hostname: 127.0.0.1", f"  port: {port}", "pool:", f"  size: {size}"]
    if pipelining in ("on", "off"):
        lines.append(f"  pipelining: {'true' if pipelining == 'on' else 'false'}")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_dispatcher(jobs: Path, config: Path, results: Path, expected: int, deadline: float,
                   sample: bool = False) -> dict[str, Any]:
    """``dispatcher run`` in a subprocess: wall, CPU and peak RSS of that process (wait4).

    Past ``deadline`` seconds (0: none) it gets SIGTERM (as documented: finish in-flight jobs,
    flush, exit) and the figures cover the jobs done by then. With ``sample``, RSS and
    the results file's size are sampled every 0.25 s (``rss_samples``: (MB, bytes)).
    """
    command = _dispatcher_command()
    if command is None:
        return {"sent": 0, "failed": expected, "error": "the dispatcher command is not installed"}
    results.unlink(missing_ok=True)
    command += ["run", str(jobs), "--config", str(config), "--results", str(results), "--no-progress"]
    start = time.perf_counter()
    with tempfile.TemporaryFile() as err:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, cwd=ROOT, env=_env())
        stopped = False
        code = None
        samples: list[tuple[float, int]] = []
        next_sample = start
        watched = _psutil_process(process.pid) if sample else None
        while True:
            pid, status, usage = os.wait4(process.pid, os.WNOHANG)
            if pid:
                code = os.waitstatus_to_exitcode(status)
                break
            now = time.perf_counter()
            if watched is not None and now >= next_sample:
                next_sample = now + 0.25
                try:
                    samples.append((watched.memory_info().rss / 2**20, results.stat().st_size if results.exists() else 0))
                except Exception:  # noqa: BLE001, S110 - the process is ending
                    pass
            if deadline and not stopped and now - start > deadline:
                process.terminate()
                stopped = True
            if stopped and now - start > deadline + 60:
                process.kill()
            time.sleep(0.02)
        wall = time.perf_counter() - start
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    sent = failed = 0
    if results.exists():
        with results.open("rb") as lines:
            for line in lines:
                if b'"status":"sent"' in line or b'"status": "sent"' in line:
                    sent += 1
                else:
                    failed += 1
    outcome: dict[str, Any] = {"sent": sent, "failed": failed, "wall": wall, "cpu": usage.ru_utime + usage.ru_stime,
                               "maxrss_mb": usage.ru_maxrss / 1024, "exit": code, "stopped": stopped}
    if samples and results.exists() and sent + failed:
        per_line = results.stat().st_size / (sent + failed)
        outcome["rss_by_jobs"] = [(size / per_line, rss) for rss, size in samples]
    if not stopped and (code != 0 or sent != expected):
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        outcome["error"] = f"exit {code}, {sent} of {expected} sent: {tail[:200]}"
    return outcome


# -- the proxy -----------------------------------------------------------------------------


class Proxy:
    def __init__(self, target_port: int, delay_ms: float) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.delay_proxy", "--target-port", str(target_port),
             "--delay-ms", str(delay_ms)], stdout=subprocess.PIPE, text=True, cwd=ROOT, env=_env())
        assert self.process.stdout is not None
        line = self.process.stdout.readline().split()
        if len(line) != 2 or line[0] != "LISTENING":
            self.stop()
            raise RuntimeError("the delaying proxy did not start")
        self.port = int(line[1])

    def measure_rtt(self, samples: int = 40) -> list[float]:
        """Round trips of NOOP through the proxy, in ms."""
        rtts = []
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
            sock.recv(1024)
            for _ in range(samples):
                start = time.perf_counter()
                sock.sendall(b"NOOP\r\n")
                sock.recv(1024)
                rtts.append(1000 * (time.perf_counter() - start))
            sock.sendall(b"QUIT\r\n")
        return rtts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=5)


# -- the run ---------------------------------------------------------------------------------


def measure_section(cases: list[Case], runs: int, port: int, sink: Sink, extra: dict[str, Any],
                    proxy: Proxy | None = None) -> None:
    for rep in range(runs):
        for case in cases:
            sink_cpu0, proxy_cpu0 = _cpu(sink.process.pid), _cpu(proxy.process.pid if proxy else None)
            if case.impl == "smtp-source":
                outcome = run_smtp_source(case, port, extra["message_file"])
            elif case.impl == "dispatcher":
                config = write_config(extra["config"], port, case.size, case.pipelining)
                jobs = extra["html_jobs" if case.html else "jobs"]
                if case.variant:
                    jobs = extra["templated_jobs"]
                    with config.open("a") as f:
                        f.write(f"templates:\n  dir: {extra['templates']}\njobs:\n  default_from: {messages.SENDER}\n"
                                "unsubscribe:\n  url: https://example.org/u/{{ id }}\n  mailto: u@example.org\n")
                        if "dkim" in case.variant:
                            f.write(f"dkim:\n  domain: example.org\n  selector: bench\n"
                                    f"  private_key: {extra['dkim_key']}\n")
                outcome = run_dispatcher(jobs, config, extra["results"], case.count, deadline=extra["deadline"])
            else:
                outcome = run_client(case, port)
            wall = outcome.get("wall")
            if wall:
                for name, before, pid in (("sink_cpu", sink_cpu0, sink.process.pid),
                                          ("proxy_cpu", proxy_cpu0, proxy.process.pid if proxy else None)):
                    after = _cpu(pid)
                    if before is not None and after is not None:
                        outcome[name] = (after - before) / wall
            case.runs.append(outcome)
            rate = outcome["sent"] / wall if wall and outcome.get("sent") else 0
            log(f"  [{rep + 1}/{runs}] {case.section:8} {case.name:22} K={case.size:<2} {case.loop:7} "
                f"pipelining={case.pipelining:7} n={case.count:<6} {rate:9.0f} msg/s"
                + (f"  ERROR {case.problem()}" if case.problem() else ""))


def memory_rows(cfg: Settings, port: int, workdir: Path, pipelining: str) -> list[dict[str, Any]]:
    rows = []
    config = write_config(workdir / "memory.yaml", port, 4, pipelining)
    for count in cfg.memory_jobs:
        jobs = workdir / f"memory-{count}.jsonl"
        log(f"  generating {count:,} jobs ...")
        messages.write_jobs(jobs, count)
        log(f"  dispatcher run on {count:,} jobs (deadline {cfg.memory_deadline:.0f} s) ...")
        outcome = run_dispatcher(jobs, config, workdir / "memory.results.jsonl", count, cfg.memory_deadline, sample=True)
        outcome["jobs"] = count
        outcome["slope"] = rss_slope(outcome.pop("rss_by_jobs", []))
        outcome["file_mb"] = jobs.stat().st_size / 2**20
        slope = outcome["slope"]
        log(f"    peak RSS {outcome.get('maxrss_mb', 0):.1f} MB, {outcome['sent']:,} sent in {outcome.get('wall', 0):.1f} s"
            + (f", RSS {slope:+.1f} MB per 100k jobs" if slope is not None else "")
            + (" (stopped at the deadline)" if outcome.get("stopped") else ""))
        rows.append(outcome)
        jobs.unlink(missing_ok=True)
        (workdir / "memory.results.jsonl").unlink(missing_ok=True)
    return rows


# -- the report ---------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions = {}
    for module in ("aiosmtplib", "uvloop"):
        try:
            versions[module] = __import__(module).__version__
        except Exception:  # noqa: BLE001
            versions[module] = "absent"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=False).stdout.strip()
    except OSError:
        commit = "?"
    return {"cpu": cpu, "cores": str(os.cpu_count()), "python": platform.python_version(),
            "os": f"{platform.system()} {platform.release()}", "aiosmtplib": versions["aiosmtplib"],
            "uvloop": versions["uvloop"], "commit": commit or "?"}


def _fmt_rate(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


def _fmt_ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}×"


def _find(cases: list[Case], **want: Any) -> Case | None:
    for case in cases:
        if all(getattr(case, k) == v for k, v in want.items()):
            return case
    return None


def _ratio(a: Case | None, b: Case | None) -> float | None:
    if a is None or b is None or a.rate() is None or b.rate() is None:
        return None
    return a.rate() / b.rate()  # type: ignore[operator]


def table(cases: list[Case], baseline: Any, extra_columns: tuple[str, ...] = ()) -> list[str]:
    head = ["row", "conns", "loop", "pipelining", "msg/s (median)", "min–max", "CPU s / 1k msgs", "vs baseline"]
    head += list(extra_columns)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for case in cases:
        rates = case.rates()
        cpu = case.cpu_per_1000()
        base = baseline(case)
        ratio = _ratio(case, base[0]) if base else None
        cells = [case.name, str(case.size), case.loop, case.pipelining, _fmt_rate(case.rate()),
                 f"{min(rates):,.0f}–{max(rates):,.0f}" if rates else "—",
                 "—" if cpu is None else f"{cpu:.3f}",
                 f"{_fmt_ratio(ratio)} {base[1]}" if base and ratio is not None else ""]
        for column in extra_columns:
            if column == "sink CPU":
                value = case.median_of("sink_cpu")
                cells.append("—" if value is None else f"{100 * value:.0f}%")
            elif column == "proxy CPU":
                value = case.median_of("proxy_cpu")
                cells.append("—" if value is None else f"{100 * value:.0f}%")
            elif column == "runs":
                cells.append(f"{len(case.ok_runs())}/{len(case.runs)}" + (f" ({case.problem()})" if case.problem() else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def evaluate(cases: list[Case], memory: list[dict[str, Any]], pipelining_default: str) -> list[tuple[str, str, str]]:
    """(target, PASS/MISS/n/a, the measured figures) for every target of issues 4 and 5."""
    verdicts: list[tuple[str, str, str]] = []

    def verdict(name: str, ok: bool | None, detail: str) -> None:
        verdicts.append((name, "n/a" if ok is None else ("PASS" if ok else "MISS"), detail))

    loop_cases = [c for c in cases if c.section == "loopback"]
    for mode in ("off", "on", "default"):
        pairs = []
        for loop in ("uvloop", "asyncio"):
            for size in (1, 4, 16):
                ratio = _ratio(_find(loop_cases, impl="pool", size=size, loop=loop, pipelining=mode),
                               _find(loop_cases, impl="minimal", size=size, loop=loop))
                if ratio is not None:
                    pairs.append((f"K={size} {loop}", ratio))
        if pairs:
            verdict(f"issue 4: pool ≥ 0.95× minimal pool, same K and loop (pipelining {mode})",
                    all(r >= 0.95 for _, r in pairs), ", ".join(f"{k}: {r:.2f}×" for k, r in pairs))
    naive = _find(loop_cases, impl="naive", loop="uvloop")
    for mode in ("off", "on", "default"):
        ratio = _ratio(_find(loop_cases, impl="pool", size=16, loop="uvloop", pipelining=mode), naive)
        if ratio is not None:
            verdict(f"issue 4: pool uvloop K=16 ≥ 4.5× naive aiosmtplib.send (pipelining {mode})", ratio >= 4.5,
                    f"{ratio:.2f}×")
    e2e = [c for c in cases if c.section == "e2e"]
    for case in [c for c in e2e if c.impl == "dispatcher" and not c.html and not c.variant]:
        ratio = _ratio(case, _find(e2e, impl="pool", pipelining=case.pipelining))
        verdict(f"issue 4: dispatcher run ≥ 0.8× library rate (K=4 uvloop, pipelining {case.pipelining})",
                None if ratio is None else ratio >= 0.8,
                "not measured: " + case.problem() if ratio is None else
                f"{_fmt_rate(case.rate())} vs {_fmt_rate(_find(e2e, impl='pool', pipelining=case.pipelining).rate())} msg/s = {ratio:.2f}×")  # type: ignore[union-attr]
    for case in [c for c in e2e if c.impl == "dispatcher" and c.variant == "templated"]:
        composed = _find(e2e, impl="dispatcher", pipelining=case.pipelining, html=False, variant="")
        ratio = _ratio(case, composed)
        verdict(f"issue 11: templated text jobs with unsubscribe ≥ 0.8× composed text jobs (pipelining {case.pipelining})",
                None if ratio is None else ratio >= 0.8,
                "not measured" if ratio is None else
                f"{_fmt_rate(case.rate())} vs {_fmt_rate(composed.rate())} jobs/s = {ratio:.2f}×")  # type: ignore[union-attr]
    for case in [c for c in e2e if c.impl == "dispatcher" and not c.variant]:
        rate, floor = case.rate(), 9_000 if case.html else 10_000
        shape = "html+text" if case.html else "text"
        verdict(f"issue 9: dispatcher run, {shape} jobs ≥ {floor:,} jobs/s (K=4 uvloop, pipelining {case.pipelining})",
                None if rate is None else rate >= floor,
                "not measured: " + case.problem() if rate is None else f"{_fmt_rate(rate)} jobs/s")
        ratio = _ratio(case, _find(e2e, impl="pool", pipelining=case.pipelining))
        if not case.html and ratio is not None:
            verdict(f"issue 9: dispatcher run ≥ 0.5× library pipelined (K=4 uvloop, pipelining {case.pipelining})",
                    ratio >= 0.5, f"{ratio:.2f}×")
    if len(memory) == 2 and all(m.get("maxrss_mb") for m in memory):
        small, large = memory
        grow = large["maxrss_mb"] - small["maxrss_mb"]
        complete = not small.get("stopped") and not large.get("stopped") and not small.get("error") and not large.get("error")
        name = f"issue 4: peak RSS of dispatcher run, {large['jobs']:,} jobs within 30 MB of {small['jobs']:,}"
        detail = f"{small['maxrss_mb']:.0f} MB → {large['maxrss_mb']:.0f} MB ({grow:+.0f} MB)"
        if complete:
            verdict(name, grow <= 30, detail)
        elif large.get("slope") is not None and not small.get("stopped"):
            # Project the unfinished large run from its own RSS growth per job.
            projected = large["maxrss_mb"] + max(0.0, large["slope"]) * (large["jobs"] - large["sent"]) / 100_000
            ok = projected - small["maxrss_mb"] <= 30
            verdicts.append((name, ("PASS" if ok else "MISS") + " (projected)",
                             f"{detail} after {large['sent']:,} of {large['jobs']:,} jobs (deadline); growth "
                             f"{large['slope']:+.1f} MB per 100k jobs → about {projected:.0f} MB at the end "
                             f"({projected - small['maxrss_mb']:+.0f} MB)"))
        else:
            verdict(name, None, detail + "; runs stopped at the deadline before the end, so not conclusive")
    proxy = [c for c in cases if c.section == "proxy"]
    for impl, mode in (("pool", "off"), ("pool", "on"), ("pool", "default"), ("minimal", "-")):
        ratio = _ratio(_find(proxy, impl=impl, size=32, pipelining=mode), _find(proxy, impl=impl, size=1, pipelining=mode))
        if ratio is not None:
            name = "minimal pool" if impl == "minimal" else f"pool (pipelining {mode})"
            proxy_cpu = _find(proxy, impl=impl, size=32, pipelining=mode).median_of("proxy_cpu")  # type: ignore[union-attr]
            note = f"{ratio:.1f}×" + (f"; proxy process at {100 * proxy_cpu:.0f}% of a core" if proxy_cpu else "")
            verdict(f"issue 4: 2 ms RTT, 32 connections ≥ 20× one — {name}", ratio >= 20, note)
    # issue 5: pipelined engine
    on = "on" if _find(loop_cases, impl="pool", pipelining="on") else None
    if on:
        ratio = _ratio(_find(loop_cases, impl="pool", size=1, loop="uvloop", pipelining="on"),
                       _find(loop_cases, impl="minimal", size=1, loop="uvloop"))
        if ratio is not None:
            verdict("issue 5: pipelined, 1 connection ≥ 4× minimal pool with 1 (uvloop)", ratio >= 4, f"{ratio:.2f}×")
        four = _find(loop_cases, impl="pool", size=4, loop="uvloop", pipelining="on")
        source = _find(loop_cases, impl="smtp-source")
        if four is not None and four.rate() is not None:
            cpu = four.cpu_per_1000() or 0
            ok = four.rate() >= 20000 and cpu <= 0.06  # type: ignore[operator]
            detail = f"{_fmt_rate(four.rate())} msg/s, {cpu:.3f} CPU s/1k"
            if source is not None and source.rate():
                ok = ok and four.rate() >= source.rate()  # type: ignore[operator]
                detail += f"; smtp-source 4 sessions {_fmt_rate(source.rate())} msg/s"
            verdict("issue 5: pipelined, 4 connections ≥ 20,000 msg/s, ≥ smtp-source, ≤ 0.06 CPU s/1k", ok, detail)
        one = _find(proxy, impl="pool", size=1, pipelining="on")
        if one is not None and one.rate() is not None:
            verdict("issue 5: 2 ms RTT, pipelined, 1 connection ≥ 350 msg/s", one.rate() >= 350,  # type: ignore[operator]
                    f"{_fmt_rate(one.rate())} msg/s")
    return verdicts


def report(cases: list[Case], memory: list[dict[str, Any]], info: dict[str, Any], cfg: Settings) -> str:
    out: list[str] = []
    m = info["machine"]
    out += ["# Benchmark results", "",
            f"- date: {info['date']}",
            f"- machine: {m['cpu']}, {m['cores']} cores, {m['os']}",
            f"- Python {m['python']}, aiosmtplib {m['aiosmtplib']}, uvloop {m['uvloop']}, commit {m['commit']}",
            f"- sink: {info['sink']}",
            f"- command: `{info['command']}` ({'quick: small counts, 1 run' if cfg.quick else f'median of {cfg.runs} runs'}), "
            f"took {info['took']:.0f} s",
            "- every client is a fresh process; CPU is that process's own (`time.process_time()` from opening the"
            " pool to closing it; `wait4` rusage for `dispatcher run` and smtp-source); the sink is another process",
            f"- messages: {info['message_bytes']:,} bytes, one recipient, unless the row says otherwise", ""]
    loop_cases = [c for c in cases if c.section == "loopback"]

    def loop_baseline(case: Case) -> tuple[Case, str] | None:
        if case.impl == "pool":
            return (_find(loop_cases, impl="minimal", size=case.size, loop=case.loop), "minimal")  # type: ignore[return-value]
        if case.impl in ("minimal", "smtp-source"):
            return (_find(loop_cases, impl="naive", loop=case.loop if case.loop != "-" else "uvloop"), "naive")  # type: ignore[return-value]
        return None

    if loop_cases:
        out += ["## Loopback, 2 KB messages", "",
                "Ratios: SMTPPool against the minimal pool at the same connections and loop; the minimal pool and "
                "smtp-source against naive `aiosmtplib.send` (a new connection per message, 8 at once).", ""]
        out += table(loop_cases, loop_baseline, ("sink CPU", "runs"))
        out.append("")
    shapes = [c for c in cases if c.section == "shapes"]
    if shapes:
        out += ["## Message shapes (4 connections, uvloop)", ""]
        for recipients, attachment, title in ((10, 0, "10 recipients, 2 KB"), (1, 1 << 20, "1 MB attachment (~1.4 MB on the wire)")):
            rows = [c for c in shapes if c.recipients == recipients and c.attachment == attachment]
            if rows:
                for row in rows:
                    row.label = f"{row.name if row.impl != 'pool' else 'SMTPPool'}, {title}"
                out += table(rows, lambda c, rows=rows: (_find(rows, impl="minimal"), "minimal") if c.impl == "pool" else None,
                             ("runs",))
                out.append("")
    proxy = [c for c in cases if c.section == "proxy"]
    if proxy:
        rtt = info.get("rtt")
        out += ["## 2 ms round trip (delaying proxy in its own process, 1 ms each way)", "",
                (f"Measured NOOP round trip through the proxy: median {rtt['median']:.2f} ms (min {rtt['min']:.2f}, "
                 f"max {rtt['max']:.2f}). " if rtt else "")
                + "Ratios against the same client with one connection. The minimal pool through the same proxy "
                "shows the proxy's own ceiling.", ""]

        def proxy_baseline(case: Case) -> tuple[Case, str] | None:
            one = _find(proxy, impl=case.impl, size=1, pipelining=case.pipelining)
            return (one, "1 conn") if one else None  # type: ignore[return-value]

        out += table(proxy, proxy_baseline, ("proxy CPU", "runs"))
        out.append("")
    e2e = [c for c in cases if c.section == "e2e"]
    if e2e:
        out += ["## dispatcher run, end to end", "",
                f"`dispatcher run JOBS --config FILE --results FILE --no-progress` on {cfg.e2e_jobs:,} generated composed "
                "jobs (~2 KB text, one recipient; the html+text row adds a ~2 KB html alternative), results file "
                "written; wall time of the whole process (start-up "
                "included), CPU and RSS from `wait4`. Against the library (SMTPPool, raw 2 KB messages) at the same "
                "settings.", ""]
        library = {c.pipelining: c for c in e2e if c.impl == "pool"}

        def e2e_baseline(case: Case) -> tuple[Case, str] | None:
            if case.impl == "dispatcher" and case.pipelining in library:
                return (library[case.pipelining], "library")
            return None

        out += table(e2e, e2e_baseline, ("runs",))
        out.append("")
    if memory:
        out += ["## Memory: peak RSS of `dispatcher run`", "",
                "Peak RSS from `wait4` of the child. The growth column is fitted on RSS sampled during the second "
                "half of the run against the jobs done by then (from the results file's size).", "",
                "| jobs | jobs file | sent | wall s | msg/s | peak RSS | RSS growth per 100k jobs | note |",
                "|---|---|---|---|---|---|---|---|"]
        for row in memory:
            note = (f"stopped by SIGTERM at the {cfg.memory_deadline:.0f} s deadline" if row.get("stopped")
                    else (row.get("error") or "complete"))
            wall = row.get("wall") or 0
            slope = row.get("slope")
            out.append(f"| {row['jobs']:,} | {row['file_mb']:.0f} MB | {row['sent']:,} | {wall:.1f} | "
                       f"{(row['sent'] / wall if wall else 0):,.0f} | {row.get('maxrss_mb', 0):.1f} MB | "
                       f"{'—' if slope is None else f'{slope:+.1f} MB'} | {note} |")
        out.append("")
    verdicts = evaluate(cases, memory, info["pipelining_default"])
    if verdicts:
        out += ["## Targets", "", "| target | verdict | measured |", "|---|---|---|"]
        out += [f"| {name} | **{status}** | {detail} |" for name, status, detail in verdicts]
        out.append("")
    if info.get("notes"):
        out += ["## Notes", ""] + [f"- {note}" for note in info["notes"]] + [""]
    return "\n".join(out)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="smtp-dispatcher benchmarks (issue 4).")
    parser.add_argument("--quick", action="store_true", help="small counts, one run each: a smoke test")
    parser.add_argument("--runs", type=int, help="runs per row (default 3; 1 with --quick)")
    parser.add_argument("--scale", type=float,
                        help="multiply every message and job count and the length of the timed rows, in every section "
                             "(default 1; 0.1 with --quick); see benchmarks/README.md for how long a run takes")
    parser.add_argument("--pipelining", choices=["on", "off", "both"], default="both",
                        help="SMTPPool rows pipelined (RFC 2920), command by command, or both (default)")
    parser.add_argument("--sink", choices=["auto", "smtp-sink", "aiosmtpd"], default="auto")
    parser.add_argument("--install-sink", action="store_true",
                        help="apt-get install postfix (root) when smtp-sink is missing; the daemon is never started")
    parser.add_argument("--only", help="comma-separated sections: loopback,shapes,proxy,e2e,memory,redis,tls,latency,dkim,relay")
    parser.add_argument("--e2e-jobs", type=int, help="jobs per dispatcher run row (default 50000: start-up is "
                                                     "~0.35 s, a tenth of a 5,000-job run)")
    parser.add_argument("--memory-jobs", help="two job counts for the RSS rows (default 100000,1000000)")
    parser.add_argument("--memory-deadline", type=float, help="seconds before a memory run is stopped (default 100; 0: let it finish)")
    parser.add_argument("--output", type=Path, default=RESULTS, help="markdown file to write (default benchmarks/RESULTS.md)")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    return parser.parse_args(argv)


def scaled(cfg: Settings, full: int, floor: int) -> int:
    """A section's count at ``--scale``, never below ``floor`` (too few to measure)."""
    return max(floor, int(full * cfg.scale))


def redis_rows(cfg: Settings) -> str:
    """1 and 2 `dispatcher worker`s through Redis against `dispatcher run` on the same
    jobs and sink, in their own processes (issue 10's target: 1 worker >= 0.7x run)."""
    if shutil.which("redis-server") is None:
        return "\n## Redis workers\n\nNot run: redis-server is not installed (apt-get install redis-server).\n"
    jobs = scaled(cfg, 20_000, 2_000)
    log(f"redis: 1 and 2 workers vs dispatcher run, {jobs} jobs x {cfg.runs} rounds")
    done = subprocess.run([sys.executable, "-m", "benchmarks.redis_workers", "--jobs", str(jobs),
                           "--rounds", str(cfg.runs)], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        return f"\n## Redis workers\n\nFailed: {done.stderr.strip().splitlines()[-1:] or done.returncode}\n"
    return "\n## Redis workers (`python -m benchmarks.redis_workers`)\n\n" + done.stdout


def tls_rows(cfg: Settings) -> str:
    """SMTPPool, the minimal pool and Nodemailer over implicit TLS (stunnel in front of
    the sink), 4 and 16 connections, in their own processes (issue 20's TLS target:
    SMTPPool >= 2x the minimal pool and >= 4x Nodemailer at 4 connections)."""
    if shutil.which("stunnel4") is None and shutil.which("stunnel") is None:
        return "\n## Over TLS\n\nNot run: stunnel is not installed (apt-get install stunnel4).\n"
    count = scaled(cfg, 6_000, 1_000)
    log(f"tls: SMTPPool, minimal pool, Nodemailer behind stunnel, {count} messages x {cfg.runs} rounds")
    done = subprocess.run([sys.executable, "-m", "benchmarks.tls", "--count", str(count), "--rounds", str(cfg.runs)],
                          capture_output=True, text=True, check=False, cwd=ROOT, env=_env())
    if done.returncode != 0:
        return f"\n## Over TLS\n\nFailed: {done.stderr.strip().splitlines()[-1:] or done.returncode}\n"
    return "\n## Over TLS (`python -m benchmarks.tls`)\n\n" + done.stdout


def latency_rows(cfg: Settings) -> str:
    """Command by command, DATA-pipelined and BDAT-pipelined against a private Postfix
    smtpd at 1 and 20 ms round trips (issue 20's target: BDAT >= 4x DATA-pipelined at
    20 ms on one connection)."""
    if os.geteuid() != 0 or find_tool("postfix") is None:
        return "\n## Round trips against Postfix smtpd\n\nNot run: needs root and Postfix (apt-get install postfix).\n"
    log(f"latency: command, DATA and BDAT against Postfix at 1 and 20 ms, {cfg.runs} rounds")
    done = subprocess.run([sys.executable, "-m", "benchmarks.latency", "--rounds", str(cfg.runs),
                           "--seconds", f"{max(1.0, 4 * cfg.scale):g}"],
                          capture_output=True, text=True, check=False, cwd=ROOT, env=_env())
    if done.returncode != 0:
        return f"\n## Round trips against Postfix smtpd\n\nFailed: {done.stderr.strip().splitlines()[-1:]}\n"
    return "\n## Round trips against Postfix smtpd (`python -m benchmarks.latency`)\n\n" + done.stdout


def dkim_rows(cfg: Settings) -> str:
    """`dispatcher run` on a templated campaign unsigned, rsa-2048 and ed25519, beside
    one core's signing rate (issue 20's DKIM targets: rsa-2048 >= 1.25x one core's RSA
    signatures/s, ed25519 >= 0.8x unsigned)."""
    jobs = scaled(cfg, 20_000, 2_000)
    log(f"dkim: templated campaign unsigned, rsa-2048, ed25519, {jobs} jobs x {cfg.runs} rounds")
    done = subprocess.run([sys.executable, "-m", "benchmarks.dkim", "--jobs", str(jobs), "--rounds", str(cfg.runs),
                           "--seconds", "1" if cfg.quick else "2"],
                          capture_output=True, text=True, check=False, cwd=ROOT, env=_env())
    if done.returncode != 0:
        return f"\n## DKIM\n\nFailed: {done.stderr.strip().splitlines()[-1:] or done.returncode}\n"
    return "\n## DKIM (`python -m benchmarks.dkim`)\n\n" + done.stdout


def relay_rows(cfg: Settings) -> str:
    """``dispatcher run`` (STARTTLS and plain) and the library against a private Postfix
    smtpd, beside Postfix's own smtp-source against the same Postfix (issue 20: how close
    to the relay's own limit)."""
    if os.geteuid() != 0 or find_tool("postfix") is None or find_tool("smtp-source") is None:
        return "\n## A real relay: Postfix smtpd\n\nNot run: needs root and Postfix (apt-get install postfix).\n"
    jobs = scaled(cfg, 5_000, 500)
    log(f"relay: smtp-source, dispatcher run (STARTTLS, plain), SMTPPool against Postfix, {jobs} x {cfg.runs} rounds")
    done = subprocess.run([sys.executable, "-m", "benchmarks.relay", "--rounds", str(cfg.runs), "--jobs", str(jobs)],
                          capture_output=True, text=True, check=False, cwd=ROOT, env=_env())
    if done.returncode != 0:
        return f"\n## A real relay: Postfix smtpd\n\nFailed: {done.stderr.strip().splitlines()[-1:]}\n"
    return "\n## A real relay: Postfix smtpd with STARTTLS (`python -m benchmarks.relay`)\n\n" + done.stdout


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    quick = args.quick
    sections = {"loopback", "shapes", "proxy", "e2e", "memory", "redis", "tls", "latency", "dkim", "relay"}
    if args.only:
        sections = {s.strip() for s in args.only.split(",")} & sections
    scale = args.scale or (0.1 if quick else 1.0)
    memory_jobs = (2000, 20000) if quick else (max(10_000, int(100_000 * scale)), max(100_000, int(1_000_000 * scale)))
    if args.memory_jobs:
        a, b = (int(x) for x in args.memory_jobs.split(","))
        memory_jobs = (a, b)
    cfg = Settings(
        runs=args.runs or (1 if quick else 3), quick=quick,
        pipelining_modes={"on": ["on"], "off": ["off"], "both": ["off", "on"]}[args.pipelining],
        scale=scale, memory_jobs=memory_jobs,
        memory_deadline=args.memory_deadline if args.memory_deadline is not None else (30 if quick else 100),
        e2e_jobs=args.e2e_jobs or (1000 if quick else max(5_000, int(50_000 * scale))), sections=sections)
    pipelining = pool_supports_pipelining()
    notes: list[str] = []
    if pipelining is None:
        notes.append("SMTPPool could not be imported: its rows are missing.")
    elif not pipelining:
        notes.append("SMTPPool has no pipelining= option yet: its rows use the default transaction path.")
    sink = start_sink(args.sink, args.install_sink, log)
    log(f"sink: {sink.description} on 127.0.0.1:{sink.port}")
    raw, _ = messages.build()
    info: dict[str, Any] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"), "machine": machine(),
        "sink": sink.description, "message_bytes": len(raw), "notes": notes,
        "command": " ".join(["./dev python -m benchmarks", *(argv if argv is not None else sys.argv[1:])]),
        "pipelining_default": "on" if pipelining else "default"}
    cases = build_cases(cfg, pipelining)
    memory: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="smtp-bench-"))
    try:
        message_file = workdir / "message.txt"
        message_file.write_bytes(raw.replace(b"\r\n", b"\n"))  # smtp-source adds the CRs and dot-stuffs
        for section in ("loopback", "shapes"):
            chosen = [c for c in cases if c.section == section]
            if chosen:
                log(f"{section}: {len(chosen)} rows × {cfg.runs} runs")
                measure_section(chosen, cfg.runs, sink.port, sink, {"message_file": message_file})
        proxy_cases = [c for c in cases if c.section == "proxy"]
        if proxy_cases:
            proxy = Proxy(sink.port, 1.0)
            try:
                rtts = proxy.measure_rtt()
                info["rtt"] = {"median": statistics.median(rtts), "min": min(rtts), "max": max(rtts)}
                log(f"proxy: {len(proxy_cases)} rows × {cfg.runs} runs, NOOP RTT median {info['rtt']['median']:.2f} ms")
                measure_section(proxy_cases, cfg.runs, proxy.port, sink, {}, proxy)
            finally:
                proxy.stop()
        e2e_cases = [c for c in cases if c.section == "e2e"]
        if e2e_cases:
            jobs = messages.write_jobs(workdir / "e2e.jsonl", cfg.e2e_jobs)
            html_jobs = messages.write_jobs(workdir / "e2e-html.jsonl", cfg.e2e_jobs, html=True)
            templated_jobs, templates_dir = messages.write_templated_jobs(workdir / "campaign", cfg.e2e_jobs)
            log(f"e2e: {len(e2e_cases)} rows × {cfg.runs} runs")
            extra = {"jobs": jobs, "html_jobs": html_jobs, "config": workdir / "e2e.yaml",
                     "templated_jobs": templated_jobs, "templates": templates_dir,
                     "dkim_key": messages.write_dkim_key(workdir / "dkim.pem"),
                     "results": workdir / "e2e.results.jsonl",
                     "deadline": 120 if not quick else 30}
            measure_section(e2e_cases, cfg.runs, sink.port, sink, extra)
            if not any(c.ok_runs() for c in e2e_cases if c.impl == "dispatcher"):
                notes.append("dispatcher run could not be measured: "
                             + "; ".join(c.problem() for c in e2e_cases if c.impl == "dispatcher"))
        if "memory" in sections:
            if _dispatcher_command() is None:
                notes.append("memory rows not run: the dispatcher command is not installed")
            else:
                log("memory:")
                mode = "on" if pipelining and "on" in cfg.pipelining_modes else "off" if pipelining else "default"
                memory = memory_rows(cfg, sink.port, workdir, mode)
    finally:
        sink.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    info["took"] = time.perf_counter() - started
    text = report(cases, memory, info, cfg)
    if "redis" in sections:
        text += redis_rows(cfg)
    if "tls" in sections:
        text += tls_rows(cfg)
    if "latency" in sections:
        text += latency_rows(cfg)
    if "dkim" in sections:
        text += dkim_rows(cfg)
    if "relay" in sections:
        text += relay_rows(cfg)
    print(text)
    if not args.no_write:
        write_results(args.output, text)
        log(f"written to {args.output}")
    return 0
