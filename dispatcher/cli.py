"""The ``dispatcher`` command: its arguments. Each subcommand runs in its own module
of ``dispatcher.commands``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from dispatcher import __version__, commands
from dispatcher.loop.suppression import Reason
from dispatcher.observe.logs import protect_stderr, standard_descriptors

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

    # docs/redis.md: jobs on a Redis Stream.
    for name, text in (("enqueue", "validate a jobs file and append its jobs to a Redis stream"),
                       ("worker", "send the jobs of a Redis stream, in its consumer group"),
                       ("status", "what a Redis stream holds: enqueued, done, pending, dead, rate"),
                       ("results", "write the results of a Redis stream to stdout (results file format)"),
                       ("requeue", "put dead-lettered (or invalid) jobs back on a Redis stream for another try")):
        _stream_arguments(name, commands.add_parser(name, help=text))
    _loop_arguments(commands)  # suppress, bounces, unsubscribe-server
    return parser


def _stream_arguments(command: str, parser: argparse.ArgumentParser) -> None:
    """The options of ``command`` (enqueue, worker, status, results)."""
    if command == "enqueue":
        parser.add_argument("jobs", metavar="JOBS", help="JSON Lines file of jobs, or - for standard input")
        parser.add_argument("--attachments-root", type=Path, metavar="DIR",
                            help="attachment paths (relative to the jobs file's directory) must resolve inside DIR, "
                                 "and are stored relative to it (default: jobs.attachments_root, else the jobs "
                                 "file's directory)")
    parser.add_argument("--redis", metavar="URL", help="redis://[:password@]host:port/db (default: redis.url, "
                        "else $DISPATCHER_REDIS_URL; both keep a password off the command line)")
    parser.add_argument("--stream", metavar="NAME", help="the jobs stream (default: redis.stream, dispatcher:jobs)")
    parser.add_argument("--config", type=Path, help="YAML configuration (see config.example.yaml)")
    if command == "worker":
        parser.add_argument("--name", help="consumer name; give a stable one so that a restarted worker takes "
                                           "back its own pending jobs at once (default: HOSTNAME-PID)")
        parser.add_argument("--attachments-root", type=Path,
                            help="attachment paths must resolve inside DIR (default: jobs.attachments_root, "
                                 "else the current directory)")
        parser.add_argument("--maildir", type=Path, default=Path("outbox"),
                            help="Maildir of the built-in capture server when no relay is configured")
        parser.add_argument("--metrics-port", type=int, metavar="PORT",
                            help="serve Prometheus metrics on PORT at /metrics (default: metrics.port)")
        parser.add_argument("--until-empty", action="store_true",
                            help="exit 0 once the stream holds no job, waiting or pending")
    if command == "status":
        parser.add_argument("--json", action="store_true", help="one JSON object instead of text")
    if command == "requeue":
        parser.add_argument("--dead", action="store_true",
                            help="the dead-lettered jobs (the default when --invalid is not given)")
        parser.add_argument("--invalid", action="store_true",
                            help="the jobs recorded invalid (e.g. after fixing the attachments root); an id invalid "
                                 "at enqueue is forgotten, so that enqueuing the fixed file adds it again")
        parser.add_argument("--ids", type=Path, metavar="FILE", help="only these ids (one a line)")


def _loop_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Declare ``suppress`` (and its five actions) on ``commands``."""
    suppress = commands.add_parser("suppress", help="the suppression list: add, remove, list, import, export")
    actions = suppress.add_subparsers(dest="action", required=True)
    reasons = [r.value for r in Reason]
    add = actions.add_parser("add", help="suppress addresses")
    add.add_argument("addresses", metavar="ADDRESS", nargs="+")
    add.add_argument("--reason", choices=reasons, default=Reason.MANUAL.value)
    add.add_argument("--detail", help="why, in words (kept with each record)")
    remove = actions.add_parser("remove", help="take addresses off the list")
    remove.add_argument("addresses", metavar="ADDRESS", nargs="+")
    listing = actions.add_parser("list", help="the records as JSON lines, oldest first")
    listing.add_argument("--reason", choices=reasons)
    imports = actions.add_parser("import", help="add the records of a CSV (address,reason,at) or JSON Lines file")
    imports.add_argument("file", metavar="FILE", help="CSV with a header line, or JSON Lines; - for standard input")
    imports.add_argument("--reason", choices=reasons, default=Reason.MANUAL.value,
                         help="the reason of rows that give none [manual]")
    export = actions.add_parser("export", help="write every record to standard output")
    export.add_argument("--format", choices=("csv", "jsonl"), default="csv",
                        help="csv: address,reason,at (with a header line) [default]; jsonl: whole records")
    export.add_argument("--reason", choices=reasons)
    for parser in (add, remove, listing, imports, export):
        parser.add_argument("--config", type=Path, help="YAML configuration (suppression.path)")

    bounces = commands.add_parser("bounces", help="read bounce and complaint reports; suppress the addresses")
    bounces.add_argument("sources", metavar="SOURCE", nargs="+",
                         help="a Maildir directory, an mbox file, or imaps://user@host[:port]/MAILBOX "
                              "(password: bounces.imap_password)")
    bounces.add_argument("--config", type=Path, help="YAML configuration (suppression.path, jobs.return_path, "
                                                     "bounces.imap_password)")
    bounces.add_argument("--results", type=Path, metavar="FILE", action="append", default=[],
                         help="results file(s) of the campaigns: a report that names no job (no VERP, no ENVID) "
                              "is matched by the returned Message-ID (repeatable)")
    bounces.add_argument("--dry-run", action="store_true",
                         help="print what would be done; suppress nothing and mark nothing seen")
    bounces.add_argument("--metrics-textfile", type=Path, metavar="FILE",
                         help="write dispatcher_bounces_total{type} to FILE at the end")

    server = commands.add_parser("unsubscribe-server", help="serve one-click unsubscribes (RFC 8058) into the "
                                                            "suppression list")
    server.add_argument("--config", type=Path, help="YAML configuration (unsubscribe.secret, suppression.path)")
    server.add_argument("--host", help="address to listen on (default: unsubscribe.server.host, 127.0.0.1)")
    server.add_argument("--port", type=int, help="port (default: unsubscribe.server.port, 8025; 0: any free one)")


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
    try:
        return commands.run(args.command, args)
    finally:
        stderr.finish()


if __name__ == "__main__":
    sys.exit(main())
