"""deploy/dispatcher-worker.service: valid for systemd (``systemd-analyze verify``, when
installed; required under CI=true), the Redis URL from an environment file and never on
the command line, restarts that cannot loop on a refused login, and an ExecStart that the
real ``dispatcher worker`` accepts."""

from __future__ import annotations

import configparser
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from _support import missing

from dispatcher.cli import _parser

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "dispatcher-worker.service"


def _service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    parser.read_string(UNIT.read_text(encoding="utf-8"))
    return parser["Service"]


def test_the_worker_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        missing("systemd-analyze is not installed (Debian package systemd; .ci/run installs it)")
    # verify checks that ExecStart's program exists: point it at this checkout's dispatcher.
    program = Path(sys.executable).parent / "dispatcher"
    unit = tmp_path / UNIT.name
    unit.write_text(UNIT.read_text(encoding="utf-8").replace("/opt/smtp-dispatcher/.venv/bin/dispatcher", str(program)))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr == "", done.stderr  # an unknown key or a bad value is only a warning there


def test_the_redis_url_comes_from_an_environment_file_and_restarts_stop_on_exit_2() -> None:
    service = _service()
    assert service["EnvironmentFile"] == "/etc/dispatcher/worker.env"
    assert "redis://" not in service["ExecStart"] and "--redis" not in service["ExecStart"]
    assert service["Restart"] == "on-failure"
    assert service["RestartPreventExitStatus"] == "2"  # a refused login: one more login per restart otherwise
    assert service["SuccessExitStatus"] == "130"  # what a worker stopped by SIGTERM exits with
    example = (ROOT / "deploy" / "worker.env.example").read_text(encoding="utf-8")
    assert "DISPATCHER_REDIS_URL=redis://" in example


def test_execstart_is_a_command_the_worker_accepts() -> None:
    words = shlex.split(_service()["ExecStart"].replace("%H", "host-1"))
    assert words[0].endswith("/dispatcher") and words[1] == "worker"
    args = _parser().parse_args(words[1:])
    assert (args.command, args.name, args.metrics_port, str(args.config)) == (
        "worker", "host-1", 9101, "/etc/dispatcher/relay.yaml")
