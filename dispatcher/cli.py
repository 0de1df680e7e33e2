"""The ``dispatcher`` command: argument parsing and exit codes only."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import re
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from dispatcher import __version__
from dispatcher.batch.journal import default_results_path
from dispatcher.batch.runner import RunError, RunOptions
from dispatcher.config import ConfigError, Settings, describe_errors, load_settings, with_pool_overrides
from dispatcher.exit import ExitCode
from dispatcher.loop import commands as loop_commands
from dispatcher.observe.logs import configure_logging, protect_stderr, standard_descriptors
from dispatcher.stream import commands as stream_commands

# argparse exits with 2 on a usage error, as docs/run.md says.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dispatcher", description="Send a lot of email through an SMTP relay.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="send every job of a JSON Lines file")
    run.add_argument("jobs", metavar="JOBS", help="JSON Lines file of jobs, or - for standard input")
    run.add_argument("--config", type=Path, help="YAML configuration (see config.example.yaml)")
    run.add_argument("--results", type=Path, help="results file (default: JOBS with .results.jsonl)")
    run.add_argument("--size", type=int, help="SMTP connections (overrides pool.size)")
    run.add_argument("--rate", type=float, help="messages per second across the pool (overrides pool.rate_limit)")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics at :PORT/metrics during the run")
    run.add_argument("--metrics-address", metavar="ADDRESS",
                     help="the address /metrics listens on (overrides metrics.address; default 0.0.0.0, all)")
    run.add_argument("--metrics-textfile", type=Path, help="write the metrics to FILE at the end")
    run.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                     help="progress bar (default: when stderr is a terminal; log lines otherwise)")
    run.add_argument("--maildir", type=Path, default=Path("outbox"),
                     help="Maildir of the built-in capture server when no relay is configured")
    run.add_argument("--retry-failed", action="store_true",
                     help="send again the recipients whose last result was a transient failure (4xx, "
                          "lost connection, timeout); never those accepted or refused permanently")
    run.add_argument("--compose-process", action=argparse.BooleanOptionalAction, default=None,
                     help="read, validate and build the jobs in a second process, for a JOBS that is a "
                          "regular file (default: when this process may use more than one core)")
    run.add_argument("--attachments-root", type=Path, metavar="DIR",
                     help="attachment paths must stay inside DIR (default: jobs.attachments_root, "
                          "else the jobs file's directory)")

    sink = commands.add_parser("sink", help="run the local capture server (aiosmtpd -> Maildir)")
    sink.add_argument("--host", default="127.0.0.1")
    sink.add_argument("--port", type=_port, default=1025)
    sink.add_argument("--maildir", type=Path, default=Path("outbox"))

    check = commands.add_parser("check-config", help="validate a configuration file")
    check.add_argument("file", type=Path)
    check.add_argument("--connect", action="store_true",
                       help="also open one session with each relay (TLS, EHLO, AUTH), show what it offers "
                            "and QUIT; nothing is sent")

    # docs/redis.md: jobs on a Redis Stream (dispatcher/stream/commands.py).
    for name, text in (("enqueue", "validate a jobs file and append its jobs to a Redis stream"),
                       ("worker", "send the jobs of a Redis stream, in its consumer group"),
                       ("status", "what a Redis stream holds: enqueued, done, pending, dead, rate"),
                       ("results", "write the results of a Redis stream to stdout (results file format)"),
                       ("requeue", "put dead-lettered (or invalid) jobs back on a Redis stream for another try")):
        stream_commands.add_arguments(name, commands.add_parser(name, help=text))
    loop_commands.add_arguments(commands)  # suppress, bounces, unsubscribe-server (dispatcher/loop/)
    return parser


def _event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run
    return uvloop.run


def tune_gc() -> None:
    """Collect young objects less often, and never look at start-up's again.

    At CPython's default (700 allocations) the ~1,000 messages in flight (their
    envelopes, futures, tasks) are traversed again and again by young collections,
    and each full collection walks the ~50,000 objects of the imported modules: about
    10% of a run's CPU. ``gc.freeze`` moves what exists now out of every collection;
    2,000 is the threshold CPython itself uses from 3.13. Cyclic garbage (a failed
    delivery's traceback) is still collected, a little later. (No ``gc.collect()``
    first: 26 ms to free the few kilobytes argparse leaves behind.)"""
    gc.freeze()
    gc.set_threshold(2000, *gc.get_threshold()[1:])


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


def _run(args: argparse.Namespace) -> int:
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
        return _event_loop_runner()(Run(options, settings).execute())
    except RunError as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        print(f"dispatcher: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.SIGNAL


def _sink(args: argparse.Namespace) -> int:
    from dispatcher.sink import CaptureServer

    configure_logging("info", "auto")

    async def serve() -> int:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with CaptureServer(args.host, args.port, args.maildir) as server:
            print(f"dispatcher sink: listening on {server.host}:{server.port}, Maildir {server.maildir}/",
                  file=sys.stderr, flush=True)
            await stop.wait()
            print(f"dispatcher sink: stopped after {server.handler.received} messages", file=sys.stderr)
        return ExitCode.OK

    try:
        return _event_loop_runner()(serve())
    except OSError as exc:
        print(f"dispatcher sink: {exc}", file=sys.stderr)
        return ExitCode.USAGE


def _check_config(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        print(f"{exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        campaign = _campaign_lines(settings)  # reads the DKIM key, compiles the unsubscribe templates
    except ValueError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if settings.relays:
        print(f"{args.file}: ok ({len(settings.relays)} relays)")
        for r in settings.relays:
            print(f"  relay {r.name}: {r.hostname}:{r.port}, weight {r.weight:g}, pool size {r.pool.size}"
                  + (f", rate limit {r.pool.rate_limit:g}/s" if r.pool.rate_limit else ""))
    else:
        relay = f"{settings.smtp.hostname}:{settings.smtp.port}" if settings.smtp else "none (built-in capture server)"
        print(f"{args.file}: ok (relay {relay}, pool size {settings.pool.size})")
    for line in campaign:
        print(f"  {line}")
    return _connect(settings) if args.connect else ExitCode.OK


def _connect(settings: Settings) -> int:
    # The session's info lines (smtp.connect) would repeat what is printed; warnings stay.
    level = settings.logging.level if settings.logging.level in ("debug", "error") else "warning"
    configure_logging(level, settings.logging.format)
    return _event_loop_runner()(_connect_relays(settings))


async def _connect_relays(settings: Settings) -> int:
    """``check-config --connect``: 0 when every relay accepts the session, else 2 with
    each relay's reason on stderr, worded as ``run`` would stop with it."""
    from dispatcher.relay_check import check_relays, describe

    checked = await check_relays(settings)
    if not checked:
        print("  connect: no relay configured; run delivers to the built-in capture server")
        return ExitCode.OK
    for relay in checked:
        for line in describe(relay):
            print(f"  {line}")
    failed = [relay.error for relay in checked if relay.error is not None]
    print("  nothing was sent" + ("" if not failed else f"; {len(failed)} of {len(checked)} relays refused"))
    for error in failed:
        print(f"dispatcher: {error}", file=sys.stderr)
    return ExitCode.USAGE if failed else ExitCode.OK


def _campaign_lines(settings: Settings) -> list[str]:
    """What check-config says of templates, unsubscribe and dkim (docs/campaigns.md), when
    set; with DKIM, the TXT record to publish. Raises ValueError (one line)."""
    from dispatcher.compose.templates import Unsubscribe

    lines = []
    if "templates" in settings.model_fields_set:
        where = settings.templates.dir
        lines.append(f"templates: {where}/" + ("" if where.is_dir() else " (no such directory yet)"))
    unsubscribe = settings.unsubscribe
    if Unsubscribe.from_settings(unsubscribe) is not None:
        given = [value for value in (unsubscribe.url, unsubscribe.mailto) if value]
        one_click = bool(unsubscribe.url and unsubscribe.url.lower().startswith("https://"))
        lines.append("unsubscribe: " + ", ".join(given) + (" (one-click, RFC 8058)" if one_click else ""))
    from pool.dkim import signers_from_settings

    signers = signers_from_settings(settings.dkim)
    for signer in signers:
        lines.append(f"dkim: {signer.algorithm} for {signer.domain}; publish this TXT record at {signer.dns_name}:")
        lines.append(f"  {signer.dns_txt()}")
    if signers and settings.jobs.default_from:
        from dispatcher.compose.address import parse_mailbox

        try:
            domain = parse_mailbox(settings.jobs.default_from).address.rpartition("@")[2]
        except ValueError as exc:
            raise ValueError(f"jobs.default_from: {exc}") from None
        if not any(signer.aligned(domain) for signer in signers):
            keys = ", ".join(sorted({signer.domain for signer in signers}))
            lines.append(f"warning: jobs.default_from is in {domain}, not in the DKIM domain {keys} or below it: "
                         "DMARC (RFC 7489) fails unless SPF aligns; sign with a key of the From domain")
    return lines


_FLAGS = {"pool.size": "--size", "pool.rate_limit": "--rate", "metrics.port": "--metrics-port",
          "metrics.address": "--metrics-address", "metrics.textfile": "--metrics-textfile"}


def _name_flags(text: str) -> str:
    """``--size (pool.size): ...`` for the settings a flag overrides."""
    for key, flag in _FLAGS.items():
        text = re.sub(rf"(?<![\w.])((?:relays\.\d+\.)?{re.escape(key)}):", rf"{flag} (\1):", text)
    return text


def _port(text: str) -> int:
    """A TCP port for argparse: 0-65535 (the kernel would take 99999 as 34463)."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port number (0-65535)")
    return port


def main(argv: list[str] | None = None) -> int:
    standard_descriptors()  # first: a closed stdin, stdout or stderr becomes /dev/null
    args = _parser().parse_args(argv)
    stderr = protect_stderr()  # a closed, full or unread stderr drops log lines; it never stops a command
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    handlers = {"run": _run, "sink": _sink, "check-config": _check_config, **stream_commands.HANDLERS,
                **loop_commands.HANDLERS}
    try:
        return handlers[args.command](args)
    finally:
        stderr.finish()


if __name__ == "__main__":
    sys.exit(main())
