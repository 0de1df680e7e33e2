"""``dispatcher bounces``: read bounce and complaint reports; suppress the addresses."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from dispatcher.config import ConfigError, Settings, load_settings
from dispatcher.exit import ExitCode
from dispatcher.loop.suppression import Store, StoreError, open_store

if TYPE_CHECKING:
    from dispatcher.loop.bounces import Source as MailSource


def main(args: argparse.Namespace) -> int:
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
