"""The operator's view (issue 12): the live display in a real pseudo-terminal, the
metrics in a live scrape of a run, the metrics port, and the files of ``deploy/``
checked by promtool."""

from __future__ import annotations

import asyncio
import json
import os
import pty
import re
import shutil
import socket
import struct
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from _support import free_port, missing
from prometheus_client.parser import text_string_to_metric_families
from rich.text import Text
from smtpserver import FaultyServer

from dispatcher.observe.progress import ProgressView, Speed

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DISPATCHER = [sys.executable, "-m", "dispatcher.cli"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
NEW_METRICS = {  # the later metrics of docs/metrics.md, by type
    "smtp_pool_transaction_seconds": "histogram",
    "smtp_pool_replies": "counter",
    "smtp_pool_rate_current": "gauge",
    "smtp_pool_relay_up": "gauge",
    "dispatcher_jobs": "counter",
    "dispatcher_jobs_read": "counter",
    "dispatcher_input_bytes_read": "gauge",
    "dispatcher_input_bytes_done": "gauge",
    "dispatcher_input_bytes_total": "gauge",
}


def job(n: int, text: str = "Hello.\n") -> dict[str, Any]:
    return {"id": f"job-{n}", "from": "sender@example.org", "to": [f"rcpt{n}@example.net"],
            "subject": f"message {n}", "text": text}


def write_jobs(path: Path, count: int, *, invalid_at: int | None = None, text: str = "Hello.\n") -> Path:
    with path.open("w") as f:
        for n in range(1, count + 1):
            f.write("{not json\n" if n == invalid_at else json.dumps(job(n, text)) + "\n")
    return path


def write_config(path: Path, server: FaultyServer, **pool: Any) -> Path:
    lines = "".join(f"  {k}: {json.dumps(v)}\n" for k, v in {"size": 2, **pool}.items())
    path.write_text(f"smtp:\n  hostname: 127.0.0.1\n  port: {server.port}\n  timeout: 5\npool:\n{lines}")
    return path


# -- the display in a pseudo-terminal --


@dataclass
class Terminal:
    """Just enough of a terminal to replay what rich writes: printable cells, CR, LF,
    cursor up (CSI n A), erase line (CSI 2 K); colours and cursor visibility are
    ignored. Lines are kept from the first (scrollback included), so a redraw that
    scrolled leaves a copy behind, as it would on screen."""

    width: int
    rows: list[list[str]] = field(default_factory=lambda: [[]])
    row: int = 0
    col: int = 0
    wrapped: list[str] = field(default_factory=list)  # the text of each row that overflowed
    unknown: list[str] = field(default_factory=list)

    _TOKEN = re.compile(r"\x1b\[([0-9;?]*)([A-Za-z])|\x1b[^\[]|[\r\n]|[^\x1b\r\n]")

    def feed(self, data: str) -> None:
        for match in self._TOKEN.finditer(data):
            token = match.group(0)
            if match.group(2):
                self._csi(match.group(1), match.group(2))
            elif token.startswith("\x1b"):
                self.unknown.append(token)
            elif token == "\r":
                self.col = 0
            elif token == "\n":
                self._move(self.row + 1)
            else:
                if self.col >= self.width:  # the terminal wraps this line
                    self.wrapped.append("".join(self.rows[self.row]))
                    self._move(self.row + 1)
                    self.col = 0
                line = self.rows[self.row]
                line.extend(" " * (self.col - len(line) + 1))
                line[self.col] = token
                self.col += 1

    def _csi(self, params: str, final: str) -> None:
        if final == "A":
            self.row = max(0, self.row - int(params or 1))
        elif final == "K":
            self.rows[self.row] = [] if params == "2" else self.rows[self.row][: self.col]
        elif final in "mlh":  # colours; ?25l / ?25h (cursor hidden, shown)
            pass
        else:
            self.unknown.append(params + final)

    def _move(self, row: int) -> None:
        self.row = row
        while len(self.rows) <= row:
            self.rows.append([])

    def lines(self) -> list[str]:
        return ["".join(line).rstrip() for line in self.rows]


class Pty:
    """A child process on a pseudo-terminal of ``columns`` x ``lines``; its output read as it comes."""

    def __init__(self, columns: int, lines: int = 24) -> None:
        import fcntl
        import termios

        self.master, self.slave = pty.openpty()
        fcntl.ioctl(self.slave, termios.TIOCSWINSZ, struct.pack("HHHH", lines, columns, 0, 0))
        self.output = bytearray()
        self.eof = asyncio.Event()
        self._changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(self.master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.master, 1 << 16)
        except OSError:  # EIO: every descriptor of the terminal's other side is closed
            data = b""
        if data:
            self.output += data
        else:
            asyncio.get_running_loop().remove_reader(self.master)
            self.eof.set()
        self._changed.set()

    def text(self) -> str:
        return self.output.decode("utf-8", "replace")

    async def until(self, predicate: Callable[[str], bool], timeout: float = 30) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self.text()):
                assert not self.eof.is_set(), f"the program ended first:\n{self.text()}"
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        if not self.eof.is_set():
            asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)


@pytest.mark.parametrize("columns", [80, 200])
async def test_display_fits_the_terminal_and_log_lines_print_above_it(
    server: FaultyServer, tmp_path: Path, columns: int
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", 300, invalid_at=3)
    config = write_config(tmp_path / "c.yaml", server)
    server.gate = asyncio.Event()  # hold the run until the display and the log line are on screen
    term = Pty(columns)
    env = {**ENV, "COLUMNS": str(columns), "LINES": "24", "TERM": "xterm-256color"}
    env.pop("NO_COLOR", None)
    try:
        proc = await asyncio.create_subprocess_exec(
            *DISPATCHER, "run", str(jobs), "--config", str(config), "--rate", "400", cwd=tmp_path, env=env,
            stdin=term.slave, stdout=term.slave, stderr=term.slave, start_new_session=True)
        os.close(term.slave)
        # The invalid line's warning, then the display drawn again below it.
        await term.until(lambda out: "job.invalid" in out and "msg/s" in out.split("job.invalid", 1)[1])
        server.gate.set()
        async with asyncio.timeout(45):
            code = await proc.wait()
            await term.eof.wait()
    finally:
        term.close()
    output = term.text()
    assert code == 1, output  # the invalid line

    screen = Terminal(columns)
    screen.feed(output)
    lines = screen.lines()
    assert not screen.unknown, screen.unknown
    assert not [row for row in screen.wrapped if "msg/s" in row or "━" in row or "sent " in row], screen.wrapped
    # The lines of the start, logged once the display is up, are wrapped by it at a space,
    # never cut by the terminal inside a word.
    assert "run.start" in output and not [row for row in screen.wrapped if "run.start" in row], screen.wrapped
    drawn = [i for i, line in enumerate(lines) if "msg/s" in line]
    assert len(drawn) == 1, "\n".join(lines)  # redraws in place: no copy scrolled up
    final = lines[drawn[0]: drawn[0] + 2]
    assert "100.0%" in final[0] and "in 0:0" in final[0], final
    counts = " ".join(final)
    assert "sent 299" in counts and "failed 0" in counts and "invalid 1" in counts and "skipped 0" in counts, final
    warned = [i for i, line in enumerate(lines) if "job.invalid" in line]
    assert warned and warned[0] < drawn[0], "\n".join(lines)
    assert "msg/s" not in lines[warned[0]] and "━" not in lines[warned[0]]  # above the display, not through it
    assert all(len(line) <= columns for line in lines[drawn[0]:drawn[0] + 2])
    summary = [i for i, line in enumerate(lines) if "run.summary" in line]
    assert summary and summary[0] > drawn[0]  # after the display has stopped


@dataclass
class _Counts:
    counts: dict[str, int]
    bytes_done: int = 123_456_789
    bytes_total: int | None = 987_654_321
    started: float = 0.0


def test_display_lines_never_exceed_the_width() -> None:
    for total in (987_654_321, None):
        view = ProgressView(_Counts({"sent": 12_345_678, "failed": 123_456, "invalid": 12_345, "skipped": 1_234_567},
                                    bytes_total=total))
        view.sample(now=1.0)
        view.sample(now=2.0)
        for width in (*range(8, 130), 200, 400):
            lines = view.lines(width)
            assert 1 <= len(lines) <= 2
            for line in lines:
                assert isinstance(line, Text) and line.cell_len <= width, (width, line.plain)
        assert len(view.lines(200)) == 1  # a wide terminal has it all on one line


def test_eta_comes_from_the_input_bytes_of_the_last_seconds() -> None:
    speed = Speed(window=10)
    assert speed.sample(0.0, 0, 0) == (0.0, 0.0)
    speed.sample(5.0, 5_000, 500_000)  # a resumed run racing through skipped lines...
    speed.sample(20.0, 6_500, 650_000)
    assert speed.sample(30.0, 7_500, 750_000) == pytest.approx((100.0, 10_000.0))  # ...is forgotten


async def test_progress_log_lines_when_stderr_is_not_a_terminal(server: FaultyServer, tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", 20)
    config = write_config(tmp_path / "c.yaml", server)
    server.gate = asyncio.Event()
    # The period shortened from 10 s, in the child only.
    script = ("import sys, dispatcher.engine.engine as r; r.LOG_PROGRESS_EVERY = 0.05; from dispatcher.cli import main; "
              "sys.exit(main(sys.argv[1:]))")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, "run", str(jobs), "--config", str(config), cwd=tmp_path, env=ENV,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while b"run.progress" not in (line := await proc.stderr.readline()):
            assert line, "no run.progress line"
        server.gate.set()
        rest = await proc.stderr.read()
        out = await proc.stdout.read() if proc.stdout else b""
        assert await proc.wait() == 0
    progress = json.loads(line)
    assert progress["event"] == "run.progress" and progress["level"] == "info"
    assert {"sent", "failed", "invalid", "skipped", "rate", "queue_depth"} <= progress.keys()
    for text in (line + rest).decode().splitlines():
        json.loads(text)  # every line is JSON: no bar, no escape sequences
    assert out == b""


# -- metrics --


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return str(response.read().decode())


def families(text: str) -> dict[str, Any]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def value(text: str, sample: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    raise AssertionError(f"no sample {sample}{labels}")


def exposed_names(text: str) -> set[str]:
    """Every series name a query can use: samples, and the families declared without any yet."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.update(s.name for s in family.samples)
        names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def deploy_metric_names() -> set[str]:
    text = "".join(path.read_text() for path in sorted(DEPLOY.iterdir()) if path.suffix in (".yml", ".json"))
    return set(re.findall(r"\b(?:smtp_pool|dispatcher)_[a-z_]+[a-z]\b", text))


async def test_live_scrape_has_every_new_metric_moving_and_every_name_deploy_uses(
    server: FaultyServer, tmp_path: Path
) -> None:
    # ~330 KB of jobs: more than one read of the file (256 KiB), so bytes read moves too;
    # a queue of 8 keeps the reader close behind the sessions.
    jobs = write_jobs(tmp_path / "jobs.jsonl", 300, text="x" * 1000 + "\n")
    size = jobs.stat().st_size
    config = write_config(tmp_path / "c.yaml", server, size=2, queue_size=8)
    port = free_port()
    server.gate = asyncio.Event()
    run = asyncio.create_task(asyncio.to_thread(
        subprocess.run, [*DISPATCHER, "run", str(jobs), "--config", str(config), "--metrics-port", str(port),
                         "--metrics-address", "127.0.0.1", "--metrics-textfile", str(tmp_path / "m.prom")],
        cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=45))
    await server.wait_for(lambda: server.data_started >= 2, timeout=30)
    first = await asyncio.to_thread(scrape, port)

    found = families(first)
    for name, kind in NEW_METRICS.items():
        assert name in found and found[name].type == kind, (name, found.get(name))
    assert not set(deploy_metric_names()) - exposed_names(first)
    assert value(first, "smtp_pool_relay_up") == 1.0
    assert value(first, "smtp_pool_rate_current") == float("inf")  # no rate limit
    assert value(first, "smtp_pool_transaction_seconds_count") == 0.0
    assert value(first, "dispatcher_jobs_total", status="sent") == 0.0
    assert value(first, "dispatcher_input_bytes_total") == size
    read_first = value(first, "dispatcher_jobs_read_total")
    assert 2 <= read_first < 100
    assert 0 < value(first, "dispatcher_input_bytes_read") < size
    assert value(first, "dispatcher_input_bytes_done") == 0  # nothing has ended: the gate holds the first two

    # Let the two messages at the gate through, and hold the next ones again.
    server.gate.set()
    server.gate.clear()
    await server.wait_for(lambda: server.data_started >= 4, timeout=30)
    async with asyncio.timeout(20):  # the child records the two results a moment after their replies
        while value(second := await asyncio.to_thread(scrape, port), "dispatcher_jobs_total", status="sent") < 2:
            await asyncio.sleep(0.02)
    assert value(second, "dispatcher_jobs_read_total") >= read_first + 2
    assert value(second, "smtp_pool_transaction_seconds_count") >= 2
    assert value(second, "smtp_pool_replies_total", code="250") >= 2
    assert 0 < value(second, "dispatcher_input_bytes_done") <= value(second, "dispatcher_input_bytes_read")

    server.gate.set()
    result = await run
    assert result.returncode == 0, result.stderr
    final = (tmp_path / "m.prom").read_text()
    assert value(final, "dispatcher_jobs_total", status="sent") == 300
    assert value(final, "dispatcher_jobs_read_total") == 300
    assert value(final, "dispatcher_input_bytes_read") == size == value(final, "dispatcher_input_bytes_total")
    assert value(final, "dispatcher_input_bytes_done") == size
    assert value(final, "smtp_pool_transaction_seconds_count") == 300
    assert value(final, "smtp_pool_replies_total", code="250") >= 300
    assert all(s.labels.get("code", "250").isdigit() and len(s.labels.get("code", "250")) == 3
               for f in text_string_to_metric_families(final) for s in f.samples)


@pytest.mark.parametrize(("address", "relay"), [(None, True), ("127.0.0.1", True), ("127.0.0.1", False)])
async def test_a_busy_metrics_port_is_one_line_naming_it_and_exit_2(
    server: FaultyServer, tmp_path: Path, address: str | None, relay: bool
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    # Without a relay the capture server would have said a line first: the port is checked before.
    config = ["--config", str(write_config(tmp_path / "c.yaml", server))] if relay else []
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        flags = ["--metrics-address", address] if address else []
        result = await asyncio.to_thread(
            subprocess.run, [*DISPATCHER, "run", str(jobs), *config, "--metrics-port", str(port), *flags],
            cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{address or '0.0.0.0'}:{port}" in lines[0] and "already in use" in lines[0], lines[0]
    assert not server.messages and not (tmp_path / "outbox").exists()


async def test_metrics_address_that_is_not_this_hosts_is_one_line_and_exit_2(
    server: FaultyServer, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", 5)
    config = write_config(tmp_path / "c.yaml", server)
    port = free_port()
    result = await asyncio.to_thread(
        subprocess.run, [*DISPATCHER, "run", str(jobs), "--config", str(config), "--metrics-port", str(port),
                         "--metrics-address", "192.0.2.1"], cwd=tmp_path, env=ENV, capture_output=True, text=True,
        timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"dispatcher: cannot serve metrics on 192.0.2.1:{port}: 192.0.2.1 is not an address of this host "
        "(metrics.address or --metrics-address)"]
    assert not server.messages


# -- deploy/ --


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        missing("promtool is not installed (Debian package prometheus): deploy/ rules not checked")
    return path


def test_alert_rules_pass_promtool_check_and_their_unit_tests() -> None:
    tool = promtool()
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts_test.yml"],
                 ["check", "config", "prometheus.yml"]):
        result = subprocess.run([tool, *args], cwd=DEPLOY, capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stdout + result.stderr
    names = {rule["alert"] for rule in _rules(DEPLOY / "alerts.yml")}
    assert names == {"SMTPRelayDown", "SMTPDeliveryFailureRatioHigh", "DispatcherRunStalled"}


def test_dashboard_queries_parse_and_use_only_spec_metrics(tmp_path: Path) -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    assert len(exprs) >= 10
    spec = {"smtp_pool_messages_total", "smtp_pool_retries_total", "smtp_pool_ambiguous_total",
            "smtp_pool_connections_open", "smtp_pool_connects_total", "smtp_pool_connect_errors_total",
            "smtp_pool_queue_depth", "dispatcher_jobs_total", "smtp_pool_replies_total", "smtp_pool_rate_current",
            "smtp_pool_relay_up", "dispatcher_jobs_read_total", "dispatcher_input_bytes_read",
            "dispatcher_input_bytes_total"}
    spec |= {f"{h}_{s}" for h in ("smtp_pool_send_seconds", "smtp_pool_transaction_seconds")
             for s in ("bucket", "sum", "count")}
    used = set(re.findall(r"\b(?:smtp_pool|dispatcher)_[a-z_]+[a-z]\b", " ".join(exprs)))
    assert used and used <= spec, used - spec
    # Every query is valid PromQL: promtool parses them as recording rules (Grafana's
    # variables replaced by what they stand for).
    tool = promtool()
    rules = [{"record": f"dashboard:query{i}", "expr": re.sub(r"\$__rate_interval", "1m", expr).replace(
        "$instance", ".*")} for i, expr in enumerate(exprs)]
    (tmp_path / "queries.yml").write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = subprocess.run([tool, "check", "rules", "queries.yml"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


def _rules(path: Path) -> list[dict[str, Any]]:
    import yaml

    return [rule for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]]
