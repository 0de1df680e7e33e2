"""``dispatcher suppress``, ``bounces`` and ``unsubscribe-server``: arguments and exit codes."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING

from dispatcher.config import ConfigError, Settings, load_settings
from dispatcher.exit import ExitCode
from dispatcher.loop.suppression import Reason, Record, Store, StoreError, now, open_store

if TYPE_CHECKING:
    from dispatcher.loop.bounces import Source as MailSource

# What a list entry must look like: one mailbox, local@domain, no space or brackets.
_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"@]+(?:\.[^\s<>()\[\],;:\"@]+)*@[^\s<>()\[\],;:\"@]+")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?")


def add_arguments(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
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


def _store(args: argparse.Namespace) -> Store:
    settings = load_settings(args.config) if args.config else Settings()
    return open_store(settings.suppression, settings.redis.url)


def suppress(args: argparse.Namespace) -> int:
    try:
        store = _store(args)
        try:
            return _ACTIONS[args.action](store, args)
        finally:
            store.close()
    except (ConfigError, StoreError, ValueError) as exc:
        print(f"dispatcher suppress: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except OSError as exc:
        print(f"dispatcher suppress: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.USAGE
    except BrokenPipeError:  # list | head
        return ExitCode.OK


def _checked(address: str, where: str) -> str:
    address = address.strip()
    if not _ADDRESS.fullmatch(address):
        raise ValueError(f"{where}: {address[:80]!r} is not an address (local@domain)")
    return address


def _add(store: Store, args: argparse.Namespace) -> int:
    records = [Record(_checked(a, "ADDRESS"), Reason(args.reason), "suppress add", None, args.detail)
               for a in args.addresses]
    added = store.add(records)
    print(f"suppressed {len(added)} address(es); {len(records) - len(added)} already on the list", file=sys.stderr)
    return ExitCode.OK


def _remove(store: Store, args: argparse.Namespace) -> int:
    removed = store.remove(args.addresses)
    print(f"removed {removed} address(es); {len(args.addresses) - removed} were not on the list", file=sys.stderr)
    return ExitCode.OK


def _list(store: Store, args: argparse.Namespace) -> int:
    out = sys.stdout
    for record in store.records(Reason(args.reason) if args.reason else None):
        out.write(json.dumps(record.as_dict(), ensure_ascii=False) + "\n")
    out.flush()
    return ExitCode.OK


def _export(store: Store, args: argparse.Namespace) -> int:
    records = store.records(Reason(args.reason) if args.reason else None)
    if args.format == "jsonl":
        return _list(store, args)
    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow(["address", "reason", "at"])
    for record in records:
        writer.writerow([record.address, record.reason.value, record.at])
    sys.stdout.flush()
    return ExitCode.OK


def _import(store: Store, args: argparse.Namespace) -> int:
    """All or nothing: a bad row names its line and nothing is added."""
    name = "standard input" if args.file == "-" else args.file
    with _open_text(args.file) as text:
        records = list(_rows(text, name, Reason(args.reason)))
    added = store.add(records)
    print(f"imported {len(added)} address(es); {len(records) - len(added)} already on the list", file=sys.stderr)
    return ExitCode.OK


def _open_text(path: str) -> IO[str]:
    if path == "-":
        return io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


def _rows(text: IO[str], name: str, default: Reason) -> Iterator[Record]:
    first = text.readline()
    rest: Iterator[str] = iter(text)
    if first.lstrip().startswith("{"):
        yield from _json_rows(first, rest, name, default)
        return
    header = [h.strip().lower() for h in next(csv.reader([first]), [])]
    start = 2
    if "address" not in header:
        # No header: one address a line (a plain list is a CSV of one column).
        header, rest, start = ["address"], _chain(first, rest), 1
    reader = csv.DictReader(rest, fieldnames=header)
    for number, row in enumerate(reader, start=start):
        address = (row.get("address") or "").strip()
        if not address:
            continue
        yield _row_record(address, row.get("reason"), row.get("at"), row.get("detail"), f"{name} line {number}",
                          default)


def _json_rows(first: str, rest: Iterator[str], name: str, default: Reason) -> Iterator[Record]:
    for number, line in enumerate(_chain(first, rest), start=1):
        if not line.strip():
            continue
        where = f"{name} line {number}"
        try:
            row = json.loads(line)
        except ValueError:
            raise ValueError(f"{where}: not JSON") from None
        if not isinstance(row, dict) or not isinstance(row.get("address"), str):
            raise ValueError(f"{where}: needs an \"address\" string")
        yield _row_record(row["address"], row.get("reason"), row.get("at"), row.get("detail"), where, default,
                          job_id=row.get("job_id"), source=row.get("source"))


def _row_record(address: str, reason: object, at: object, detail: object, where: str, default: Reason, *,
                job_id: object = None, source: object = None) -> Record:
    address = _checked(address, where)
    if reason in (None, ""):
        kind = default
    else:
        try:
            kind = Reason(str(reason).strip())
        except ValueError:
            raise ValueError(f"{where}: reason {str(reason)[:40]!r} is not one of "
                             + ", ".join(r.value for r in Reason)) from None
    if at in (None, ""):
        when = now()
    elif isinstance(at, str) and _TIME.fullmatch(at.strip()):
        when = at.strip()
    else:
        raise ValueError(f"{where}: at must be an ISO 8601 time (2026-01-31T12:00:00Z)")
    return Record(address, kind, str(source) if source else "suppress import", str(job_id) if job_id else None,
                  str(detail) if detail else None, when)


def _chain(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest


_ACTIONS: dict[str, Callable[[Store, argparse.Namespace], int]] = {
    "add": _add, "remove": _remove, "list": _list, "import": _import, "export": _export,
}


def unsubscribe_server(args: argparse.Namespace) -> int:
    from dispatcher.loop.unsubscribe_server import UnsubscribeApp, listen, serve
    from dispatcher.observe.logs import configure_logging

    try:
        settings = load_settings(args.config) if args.config else Settings()
    except ConfigError as exc:
        print(f"dispatcher unsubscribe-server: config error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    secret = settings.unsubscribe.secret
    if secret is None:
        print("dispatcher unsubscribe-server: unsubscribe.secret is not set (the key that signs {{ token }} in "
              "unsubscribe.url); set it in --config", file=sys.stderr)
        return ExitCode.USAGE
    configure_logging(settings.logging.level, settings.logging.format)
    host = args.host or settings.unsubscribe.server.host
    port = args.port if args.port is not None else settings.unsubscribe.server.port
    try:
        sock = listen(host, port)
    except OSError as exc:
        print(f"dispatcher unsubscribe-server: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        store = open_store(settings.suppression, settings.redis.url)
    except StoreError as exc:
        print(f"dispatcher unsubscribe-server: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    app = UnsubscribeApp(store, secret.get_secret_value())
    bound = sock.getsockname()[1]
    print(f"dispatcher unsubscribe-server: listening on http://{host}:{bound}/ (suppression list "
          f"{store.path})", file=sys.stderr, flush=True)
    try:
        import uvloop

        uvloop.run(serve(app, sock))
    except KeyboardInterrupt:
        return ExitCode.SIGNAL
    finally:
        store.close()
    return ExitCode.OK


def bounces(args: argparse.Namespace) -> int:
    """Each source in turn: classify every unread message, print a JSON line per
    report, suppress, then mark the classified messages seen (unknown ones untouched).
    Exit 0; 2 when a source or the configuration cannot be used."""
    from dispatcher.loop.bounces import SourceError, open_source
    from dispatcher.observe.metrics import write_textfile

    try:
        settings = load_settings(args.config) if args.config else Settings()
    except ConfigError as exc:
        print(f"dispatcher bounces: config error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        reading = _BounceReading(settings, _message_ids(args.results), dry_run=args.dry_run)
    except OSError as exc:
        print(f"dispatcher bounces: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        store = open_store(settings.suppression, settings.redis.url)
    except StoreError as exc:
        print(f"dispatcher bounces: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    password = settings.bounces.imap_password
    status = ExitCode.OK
    try:
        for spec in args.sources:
            try:
                source = open_source(spec, password=password.get_secret_value() if password else None,
                                     timeout=settings.bounces.imap_timeout, ca_file=settings.bounces.ca_file)
            except SourceError as exc:
                print(f"dispatcher bounces: {exc}", file=sys.stderr)
                status = ExitCode.USAGE
                continue
            try:
                reading.read(source, store)
            except (SourceError, OSError) as exc:
                print(f"dispatcher bounces: {source.name}: {exc}", file=sys.stderr)
                status = ExitCode.USAGE
            finally:
                source.close()
    except StoreError as exc:
        print(f"dispatcher bounces: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    finally:
        store.close()
    print(f"dispatcher bounces: {reading.summary()}", file=sys.stderr)
    if args.metrics_textfile is not None:
        problem = write_textfile(args.metrics_textfile, reading.registry)
        if problem is not None:
            print(f"dispatcher bounces: {problem}", file=sys.stderr)
    return status


class _BounceReading:
    """What ``bounces`` reads from its sources: a JSON line per report on stdout, the
    reports' counts (and their metric), the suppressions."""

    def __init__(self, settings: Settings, by_message_id: dict[str, str], *, dry_run: bool) -> None:
        from prometheus_client import CollectorRegistry, Counter

        from dispatcher.loop.bounces import Kind
        from dispatcher.loop.verp import ReturnPath

        self.return_path = ReturnPath(settings.jobs.return_path) if settings.jobs.return_path else None
        self.by_message_id = by_message_id
        self.dry_run = dry_run
        self.registry = CollectorRegistry()
        self.counted = Counter("dispatcher_bounces", "Reports read by dispatcher bounces, by type.", ["type"],
                               registry=self.registry)
        for kind in Kind:
            self.counted.labels(kind.value)
        self.totals: dict[str, int] = {}

    def read(self, source: MailSource, store: Store) -> None:
        """Every unread message of ``source``; then, unless a dry run, suppress and mark
        the classified messages seen. Raises SourceError, OSError, StoreError."""
        from dispatcher.loop.bounces import Kind, classify

        processed = []
        records = []
        for item in source.messages():
            reports = classify(item.raw, self.return_path)
            for report in reports:
                job_id = report.job_id or self.by_message_id.get(report.message_id or "")
                report = dataclasses.replace(report, source=f"{source.name}#{item.key}", job_id=job_id)
                self.counted.labels(report.type.value).inc()
                self.totals[report.type.value] = self.totals.get(report.type.value, 0) + 1
                sys.stdout.write(json.dumps(report.as_dict(), ensure_ascii=False) + "\n")
                if report.suppresses:
                    records.append(report.record())
            if any(r.type is not Kind.UNKNOWN for r in reports):
                processed.append(item)
        sys.stdout.flush()
        if not self.dry_run:
            store.add(records)  # first: a message is marked only once its addresses are on the list
            source.mark_seen(processed)

    def summary(self) -> str:
        summary = ", ".join(f"{n} {kind}" for kind, n in sorted(self.totals.items())) or "no reports"
        return summary + (" (dry run: nothing changed)" if self.dry_run else "")


def _message_ids(paths: list[Path]) -> dict[str, str]:
    """Message-ID -> job id from results files (their rows name what each job was sent
    with); rows that are not JSON or name no Message-ID are passed over."""
    found: dict[str, str] = {}
    for path in paths:
        with path.open("rb") as rows:
            for raw in rows:
                try:
                    row = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(row, dict) and isinstance(row.get("message_id"), str) and isinstance(row.get("id"), str):
                    found[row["message_id"]] = row["id"]
    return found


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "suppress": suppress, "bounces": bounces, "unsubscribe-server": unsubscribe_server,
}
