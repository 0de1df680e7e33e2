"""``dispatcher run``: send every job of a JSON Lines file (``dispatcher.batch``)."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from pydantic import ValidationError

from dispatcher.batch.journal import default_results_path
from dispatcher.batch.runner import RunError, RunOptions
from dispatcher.commands.common import event_loop_runner, tune_gc
from dispatcher.config import ConfigError, Settings, describe_errors, load_settings, with_pool_overrides
from dispatcher.exit import ExitCode
from dispatcher.observe.logs import configure_logging


def main(args: argparse.Namespace) -> int:
    from dispatcher.batch.runner import Run

    try:
        settings = _settings(args)
    except ConfigError as exc:
        print(f"dispatcher: config error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except ValidationError as exc:  # the file was valid alone: a flag's value is wrong
        print(f"dispatcher: bad option: {_name_flags(describe_errors(exc))}", file=sys.stderr)
        return ExitCode.USAGE
    if args.jobs == "-" and args.results is None:
        print("dispatcher: --results is required when JOBS is - (standard input)", file=sys.stderr)
        return ExitCode.USAGE
    if args.jobs != "-" and not Path(args.jobs).exists():
        print(f"dispatcher: {args.jobs}: no such jobs file", file=sys.stderr)
        return ExitCode.USAGE
    configure_logging(settings.logging.level, settings.logging.format)
    options = RunOptions(
        jobs=args.jobs,
        results=args.results or default_results_path(args.jobs),
        progress=args.progress,
        maildir=args.maildir,
        attachments_root=args.attachments_root,
        retry_failed=args.retry_failed,
        compose_process=args.compose_process,
    )
    tune_gc()  # after the imports and the settings, before the compose process forks (it inherits both)
    try:
        return event_loop_runner()(Run(options, settings).execute())
    except RunError as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.SIGNAL


def _settings(args: argparse.Namespace) -> Settings:
    settings = load_settings(args.config) if args.config else Settings()
    settings = with_pool_overrides(settings, size=args.size, rate_limit=args.rate)  # every relay's pool too
    metrics = settings.metrics.model_copy(update={
        k: v for k, v in (("port", args.metrics_port), ("address", args.metrics_address),
                          ("textfile", args.metrics_textfile)) if v is not None
    })
    updated = settings.model_copy(update={"metrics": metrics})
    # Re-validate so that flags get the file's checks (size >= 1, rate > 0...).
    return Settings.model_validate(updated.model_dump())


_FLAGS = {"pool.size": "--size", "pool.rate_limit": "--rate", "metrics.port": "--metrics-port",
          "metrics.address": "--metrics-address", "metrics.textfile": "--metrics-textfile"}


def _name_flags(text: str) -> str:
    """``--size (pool.size): ...`` for the settings a flag overrides."""
    for key, flag in _FLAGS.items():
        text = re.sub(rf"(?<![\w.])((?:relays\.\d+\.)?{re.escape(key)}):", rf"{flag} (\1):", text)
    return text
