"""``dispatcher run`` when the relay is the problem (issue 8), end to end: the command in
a subprocess against real servers (tests/smtpserver.py, trustme for TLS).

A relay down and back up mid-run, down for longer than ``relay_down_timeout`` (exit 3),
refusing the login (exit 2), trusted through ``smtp.ca_file``; and ``relays:``: two
relays with one stopped mid-run, weights over 2,000 jobs, the ``relay`` column and label.
"""

from __future__ import annotations

import asyncio
import json
import os
import ssl
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml
from _support import free_port
from smtpserver import FaultyServer
from test_dispatcher import DISPATCHER, ROOT, delivered_ids, dispatcher, job, write_jobs

from dispatcher.config import ConfigError, parse_settings, with_pool_overrides

pytestmark = pytest.mark.timeout(60)

FAST_RETRY = {"backoff_base": 0.02, "backoff_max": 0.2}


def rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def smtp(port: int, **extra: Any) -> dict[str, Any]:
    return {"hostname": "127.0.0.1", "port": port, "timeout": 5, **extra}


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    document.setdefault("retry", FAST_RETRY)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def dispatcher_lines(err: str) -> list[str]:
    """What the command says to a person (the rest of stderr is JSON log lines)."""
    return [line for line in err.splitlines() if line.startswith("dispatcher:")]


class Running:
    """``dispatcher run`` in a subprocess whose stderr is read as it comes, so that a
    test can await a log event instead of sleeping."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    @classmethod
    async def start(cls, *args: str, cwd: Path, env: dict[str, str] | None = None) -> Running:
        proc = await asyncio.create_subprocess_exec(
            *DISPATCHER, "run", *args, "--no-progress", cwd=cwd,
            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
        return cls(proc)

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode(errors="replace").rstrip("\n"))
            self._changed.set()
            self._changed = asyncio.Event()
        self._changed.set()

    def events(self, name: str) -> int:
        return sum(1 for line in self.lines if f'"event": "{name}"' in line)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 20) -> None:
        async with asyncio.timeout(timeout):
            while not predicate():
                if self._reader.done():
                    raise AssertionError("the run ended first:\n" + "\n".join(self.lines[-20:]))
                await self._changed.wait()

    async def finish(self, timeout: float = 40) -> tuple[int, str]:
        async with asyncio.timeout(timeout):
            await self._reader
            code = await self.proc.wait()
        return code, "\n".join(self.lines)


# -- one relay: down, then up ------------------------------------------------------------


async def test_relay_down_then_up_mid_run_holds_the_queue_and_sends_everything_once(tmp_path: Path) -> None:
    count, port = 200, free_port()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(count)])
    config = write_yaml(tmp_path / "c.yaml", {
        "smtp": smtp(port, relay_down_timeout=60), "pool": {"size": 4},
        "retry": {"max_attempts": 2, **FAST_RETRY},
        "logging": {"level": "debug"}})  # connect errors after the first of an outage are debug
    run = await Running.start(str(jobs), "--config", str(config), cwd=tmp_path)
    # Nothing listens: far more failed connects than max_attempts, and nothing is recorded.
    await run.wait_for(lambda: run.events("smtp.connect_error") >= 10)
    assert rows(tmp_path / "jobs.results.jsonl") == []
    async with FaultyServer(port=port) as server:
        code, err = await run.finish()
    assert code == 0, err
    assert dispatcher_lines(err) == []
    results = rows(tmp_path / "jobs.results.jsonl")
    assert len(results) == count and {r["status"] for r in results} == {"sent"}
    assert {r["attempts"] for r in results} == {1}, "waiting for the relay spent no attempt"
    assert all("relay" not in r for r in results), "no relay column with a single smtp: section"
    assert delivered_ids(server) == {f"job-{i}": 1 for i in range(count)}


async def test_relay_down_for_longer_than_relay_down_timeout_exits_3_and_the_rerun_completes(
    tmp_path: Path
) -> None:
    count, port = 50, free_port()
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(count)])
    config = write_yaml(tmp_path / "c.yaml", {"smtp": smtp(port, relay_down_timeout=0.5), "pool": {"size": 2}})
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 3, err
    assert "Traceback" not in err
    said = dispatcher_lines(err)
    assert len(said) == 1, said
    assert said[0].startswith(f"dispatcher: relay 127.0.0.1:{port} unreachable for "), said
    assert rows(tmp_path / "jobs.results.jsonl") == [], "nothing recorded for the jobs not sent"
    async with FaultyServer(port=port) as server:
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert delivered_ids(server) == {f"job-{i}": 1 for i in range(count)}
    assert [r["status"] for r in rows(tmp_path / "jobs.results.jsonl")] == ["sent"] * count


# -- permanent session failures: AUTH, certificates ---------------------------------------


async def test_rejected_login_exits_2_after_one_login_and_the_rerun_with_the_right_password_sends_all(
    tmp_path: Path
) -> None:
    count, size = 100, 4
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(count)])
    async with FaultyServer(credentials=("user", "right-one")) as server:
        # start_tls: false — the test server speaks plain text, and a password is never
        # sent in clear unless the config says so (docs/library.md promise 11).
        config = write_yaml(tmp_path / "c.yaml", {
            "smtp": smtp(server.port, start_tls=False, username="user", password="${SMTP_PASSWORD}"),
            "pool": {"size": size}})
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path,
                                        env={"SMTP_PASSWORD": "hunter2-wrong"})
        assert code == 2, err
        said = dispatcher_lines(err)
        assert len(said) == 1, said
        assert said[0].startswith(f"dispatcher: relay 127.0.0.1:{server.port} refused the login: 535 "), said
        # One login for the whole run (aiosmtplib tries PLAIN then LOGIN within it), not one per job.
        assert 1 <= len(server.auth_attempts) <= 2, server.auth_attempts
        assert "hunter2-wrong" not in err
        assert rows(tmp_path / "jobs.results.jsonl") == [] and server.messages == []
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path,
                                        env={"SMTP_PASSWORD": "right-one"})
    assert code == 0, err
    assert delivered_ids(server) == {f"job-{i}": 1 for i in range(count)}


async def test_a_private_ca_is_trusted_through_smtp_ca_file(tmp_path: Path) -> None:
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    bundle = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(20)])
    env = {"SSL_CERT_FILE": "", "SSL_CERT_DIR": ""}  # the system's CAs only, whatever the caller's shell says
    async with FaultyServer(tls_context=context) as server:
        untrusted = write_yaml(tmp_path / "untrusted.yaml", {"smtp": smtp(server.port, use_tls=True)})
        code, _, err = await dispatcher("run", str(jobs), "--config", str(untrusted), cwd=tmp_path, env=env)
        assert code == 2, err
        said = dispatcher_lines(err)
        assert len(said) == 1 and "certificate" in said[0], said
        assert rows(tmp_path / "jobs.results.jsonl") == []
        # The fixed re-run sends every job (it used to send 0 and say "skipped").
        trusted = write_yaml(tmp_path / "trusted.yaml", {"smtp": smtp(server.port, use_tls=True, ca_file=str(bundle))})
        code, _, err = await dispatcher("run", str(jobs), "--config", str(trusted), cwd=tmp_path, env=env)
    assert code == 0, err
    assert delivered_ids(server) == {f"job-{i}": 1 for i in range(20)}


# -- relays: -------------------------------------------------------------------------------


async def test_two_relays_with_one_stopped_mid_run_deliver_everything_through_the_survivor(tmp_path: Path) -> None:
    count = 400
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(count)])
    async with FaultyServer() as survivor:
        doomed = await FaultyServer().start()
        doomed.faults.delay = 0.005  # keeps the run going long enough to stop a relay under it
        survivor.faults.delay = 0.005
        config = write_yaml(tmp_path / "c.yaml", {
            "relays": [{"name": "doomed", **smtp(doomed.port, relay_down_timeout=0.5)},
                       {"name": "survivor", **smtp(survivor.port, relay_down_timeout=0.5)}],
            "pool": {"size": 2}})
        run = await Running.start(str(jobs), "--config", str(config), cwd=tmp_path)
        try:
            await doomed.wait_for(lambda: len(doomed.messages) >= 40)
            await doomed.stop()
            code, err = await run.finish()
        finally:
            await doomed.stop()
    assert code == 0, err
    results = rows(tmp_path / "jobs.results.jsonl")
    assert len(results) == count and {r["status"] for r in results} == {"sent"}
    relay_of = {r["id"]: r["relay"] for r in results}
    assert set(relay_of.values()) == {"doomed", "survivor"}
    by_doomed, by_survivor = delivered_ids(doomed), delivered_ids(survivor)
    assert set(by_doomed) | set(by_survivor) == set(relay_of), "every job delivered"
    # Each row names the relay that accepted it; the survivor took over all the rest.
    assert all(job_id in (by_doomed if relay == "doomed" else by_survivor) for job_id, relay in relay_of.items())
    assert Counter(relay_of.values())["survivor"] >= count - len(doomed.messages)
    # Only messages the stopped relay had on the wire when it went away can have gone out twice.
    twice = {job_id for job_id in relay_of if by_doomed[job_id] + by_survivor[job_id] > 1}
    assert twice <= set(by_doomed) and len(twice) <= 2 * 2, twice


async def test_weights_are_honoured_within_10_percent_over_2000_jobs(tmp_path: Path) -> None:
    count = 2000
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(count)])
    async with FaultyServer() as heavy, FaultyServer() as light:
        config = write_yaml(tmp_path / "c.yaml", {
            "relays": [{"name": "heavy", "weight": 3, **smtp(heavy.port)},
                       {"name": "light", **smtp(light.port), "pool": {"size": 2}}],
            "pool": {"size": 4}})
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config),
                                        "--metrics-textfile", str(tmp_path / "m.prom"), cwd=tmp_path)
    assert code == 0, err
    shares = Counter(r["relay"] for r in rows(tmp_path / "jobs.results.jsonl"))
    assert abs(shares["heavy"] - 1500) <= 150 and abs(shares["light"] - 500) <= 50, shares
    assert (len(heavy.messages), len(light.messages)) == (shares["heavy"], shares["light"])
    assert heavy.max_concurrent <= 4 and light.max_concurrent <= 2, "each relay has its own pool size"
    metrics = (tmp_path / "m.prom").read_text()
    for name, n in shares.items():
        assert f'smtp_pool_messages_total{{outcome="sent",relay="{name}"}} {float(n)}' in metrics, metrics
    assert 'dispatcher_jobs_total{status="sent"} 2000.0' in metrics


async def test_a_relay_refusing_the_login_is_skipped_and_the_run_goes_on(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(60)])
    async with FaultyServer(credentials=("user", "right")) as locked, FaultyServer() as open_relay:
        config = write_yaml(tmp_path / "c.yaml", {"relays": [
            {"name": "locked", **smtp(locked.port, start_tls=False, username="user", password="wrong")},
            {"name": "open", **smtp(open_relay.port)}]})
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert {r["relay"] for r in rows(tmp_path / "jobs.results.jsonl")} == {"open"}
    assert len(open_relay.messages) == 60 and len(locked.auth_attempts) <= 2


async def test_every_relay_down_exits_3_with_nothing_recorded(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(20)])
    config = write_yaml(tmp_path / "c.yaml", {"relays": [
        {"name": "a", **smtp(free_port(), relay_down_timeout=0.3)},
        {"name": "b", **smtp(free_port(), relay_down_timeout=0.3)}]})
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 3, err
    said = dispatcher_lines(err)  # one line per relay at most, each naming its relay
    assert 1 <= len(said) <= 2 and all("unreachable" in line for line in said), said
    assert rows(tmp_path / "jobs.results.jsonl") == []


async def test_messages_moved_off_a_down_relay_are_not_counted_as_failed(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(40)])
    async with FaultyServer() as up:
        config = write_yaml(tmp_path / "c.yaml", {"relays": [
            {"name": "down", **smtp(free_port(), relay_down_timeout=0.3)}, {"name": "up", **smtp(up.port)}]})
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config),
                                        "--metrics-textfile", str(tmp_path / "m.prom"), cwd=tmp_path)
    assert code == 0, err
    assert len(up.messages) == 40
    metrics = (tmp_path / "m.prom").read_text()
    assert 'smtp_pool_messages_total{outcome="sent",relay="up"} 40.0' in metrics
    assert 'smtp_pool_messages_total{outcome="failed",relay="down"} 0.0' in metrics, metrics


async def test_a_failed_row_names_the_relay_that_refused_it(tmp_path: Path) -> None:
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1, to=["gone@example.net"])])
    async with FaultyServer() as server:
        server.faults.rcpt["gone@example.net"] = "550 5.1.1 no such user"
        config = write_yaml(tmp_path / "c.yaml", {"relays": [{"name": "only", **smtp(server.port)}]})
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), cwd=tmp_path)
    assert code == 1, err
    (row,) = rows(tmp_path / "jobs.results.jsonl")
    assert row["status"] == "failed" and row.get("relay") == "only", row


# -- the relays: section -------------------------------------------------------------------


def test_relay_pools_take_the_top_level_pool_keys_they_leave_out_and_flags_override_all() -> None:
    settings = parse_settings({
        "relays": [{"name": "ses", "hostname": "email-smtp.example.com", "port": 587, "weight": 3,
                    "pool": {"size": 10, "rate_limit": 14}},
                   {"name": "backup", "hostname": "smtp.example.net"}],
        "pool": {"size": 2, "idle_timeout": 5}})
    assert settings.relays is not None
    ses, backup = settings.relays
    assert (ses.pool.size, ses.pool.rate_limit, ses.pool.idle_timeout) == (10, 14, 5)
    assert (backup.pool.size, backup.pool.rate_limit, backup.weight) == (2, None, 1)
    flagged = with_pool_overrides(settings, size=7, rate_limit=None)
    assert flagged.relays is not None and [r.pool.size for r in flagged.relays] == [7, 7]
    assert [r.pool.rate_limit for r in flagged.relays] == [14, None]
    again = type(settings).model_validate(flagged.model_dump())  # what the CLI does with its flags
    assert again == flagged


@pytest.mark.parametrize(("document", "message"), [
    ({"smtp": {"hostname": "a"}, "relays": [{"name": "x", "hostname": "b"}]}, "relays: smtp and relays are both set"),
    ({"relays": [{"name": "x", "hostname": "a"}, {"name": "x", "hostname": "b"}]}, "two relays are named 'x'"),
    ({"relays": []}, "relays: List should have at least 1 item"),
    ({"relays": [{"hostname": "a"}]}, "relays.0.name: Field required"),
    ({"relays": [{"name": "x", "hostname": "a", "weight": 0}]}, "relays.0.weight: Input should be greater than 0"),
    ({"relays": [{"name": "x", "hostname": "a", "pool": {"sise": 2}}]}, "relays.0.pool.sise: unknown key"),
])
def test_relays_config_errors_name_the_key(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_settings(document, "c.yaml")
    assert message in str(caught.value), str(caught.value)


async def test_check_config_lists_the_relays_and_run_refuses_smtp_with_relays(tmp_path: Path) -> None:
    config = write_yaml(tmp_path / "c.yaml", {
        "relays": [{"name": "ses", "hostname": "email-smtp.example.com", "port": 587, "weight": 3,
                    "pool": {"size": 10, "rate_limit": 14}},
                   {"name": "backup", "hostname": "smtp.example.net"}]})
    code, out, err = await dispatcher("check-config", str(config), cwd=tmp_path)
    assert code == 0, err
    assert out.splitlines() == [
        f"{config}: ok (2 relays)",
        "  relay ses: email-smtp.example.com:587, weight 3, pool size 10, rate limit 14/s",
        "  relay backup: smtp.example.net:25, weight 1, pool size 4",
    ]
    both = write_yaml(tmp_path / "both.yaml", {"smtp": smtp(25), "relays": [{"name": "x", **smtp(26)}]})
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1)])
    code, _, err = await dispatcher("run", str(jobs), "--config", str(both), cwd=tmp_path)
    assert code == 2
    assert err.strip() == f"dispatcher: config error: {both}: relays: smtp and relays are both set; keep one " \
                          "(relays: a list of smtp sections, each with a name)", err


async def test_a_ca_file_that_cannot_be_loaded_is_a_config_error_at_once(server: FaultyServer, tmp_path: Path) -> None:
    """Not a relay "down" for relay_down_timeout, then exit 3: exit 2 naming the key."""
    (tmp_path / "broken.pem").write_text("not a certificate\n")
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(1)])
    for ca_file, why in ((tmp_path / "nope.pem", "no such file"), (tmp_path / "broken.pem", "not a PEM file")):
        config = write_yaml(tmp_path / "c.yaml", {"smtp": smtp(server.port, use_tls=True, ca_file=str(ca_file))})
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
        assert code == 2, err
        assert f"smtp.ca_file: {ca_file}: {why}" in err, err
        assert "Value error" not in err
    assert not server.messages and not (tmp_path / "jobs.results.jsonl").exists()
    with pytest.raises(ValueError, match=r"ca_file: .*no such file"):
        from pool import SMTPPool
        SMTPPool(hostname="127.0.0.1", port=server.port, ca_file=str(tmp_path / "nope.pem"))
