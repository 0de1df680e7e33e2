"""``dispatcher suppress``: the suppression list (add, remove, list, import, export)."""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
import sys
from collections.abc import Callable, Iterator
from typing import IO

from dispatcher.config import ConfigError, Settings, load_settings
from dispatcher.exit import ExitCode
from dispatcher.loop.suppression import Reason, Record, Store, StoreError, now, open_store

# What a list entry must look like: one mailbox, local@domain, no space or brackets.
_ADDRESS = re.compile(r"[^\s<>()\[\],;:\"@]+(?:\.[^\s<>()\[\],;:\"@]+)*@[^\s<>()\[\],;:\"@]+")
_TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d+)?(?:Z|[+-]\d\d:?\d\d)?")


def main(args: argparse.Namespace) -> int:
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


def _store(args: argparse.Namespace) -> Store:
    settings = load_settings(args.config) if args.config else Settings()
    return open_store(settings.suppression, settings.redis.url)


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
