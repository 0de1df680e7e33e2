"""The four Redis commands (docs/redis.md): options -> settings -> run -> exit status.

``dispatcher.cli`` declares their arguments and calls these; Redis is imported only
when one of them runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from dispatcher.config import ConfigError, Settings, load_settings
from dispatcher.exit import ExitCode
from dispatcher.observe.logs import configure_logging

URL_VARIABLE = "DISPATCHER_REDIS_URL"


def add_arguments(command: str, parser: argparse.ArgumentParser) -> None:
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


def _loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency where it builds
        return asyncio.run
    return uvloop.run


def _settings(args: argparse.Namespace, command: str) -> tuple[Settings, str, str] | int:
    try:
        settings = load_settings(args.config) if args.config else Settings()
    except ConfigError as exc:
        print(f"dispatcher {command}: config error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    # The URL may hold a password: from the config or the environment it is not on the
    # command line, where `ps` shows it to every user of the machine.
    url = args.redis or settings.redis.url or os.environ.get(URL_VARIABLE)
    if not url:
        print(f"dispatcher {command}: --redis URL is required (or redis.url in --config, or {URL_VARIABLE})",
              file=sys.stderr)
        return ExitCode.USAGE
    return settings, url, args.stream or settings.redis.stream


def _run(command: str, args: argparse.Namespace,
         body: Callable[[Any, Any, Settings, str], Awaitable[int]]) -> int:
    """Connect (exit 2 with one line naming the URL when Redis cannot be used), then run.
    A Redis error that waiting will not cure is one line too, exit 2."""
    from redis.exceptions import RedisError

    from dispatcher.stream.keys import Keys
    from dispatcher.stream.store import RedisUnavailable, check, check_types, client, describe

    prepared = _settings(args, command)
    if isinstance(prepared, int):
        return prepared
    settings, url, stream = prepared
    configure_logging(settings.logging.level, settings.logging.format)

    async def main() -> int:
        redis = client(url)
        try:
            await check(redis, url)
            await check_types(redis, Keys(stream))
            return await body(redis, Keys(stream), settings, url)
        finally:
            await redis.aclose()

    try:
        return _loop_runner()(main())
    except RedisUnavailable as exc:
        print(f"dispatcher {command}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except RedisError as exc:
        print(f"dispatcher {command}: {describe(exc, Keys(stream), settings.redis.group)}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.SIGNAL


def enqueue(args: argparse.Namespace) -> int:
    from redis.exceptions import RedisError

    from dispatcher.compose.stage import Composer
    from dispatcher.loop.suppression import Admission, StoreError, open_store
    from dispatcher.stream.enqueue import Enqueuer, open_jobs
    from dispatcher.stream.store import describe

    if args.jobs != "-" and not Path(args.jobs).is_file():
        print(f"dispatcher enqueue: {args.jobs}: no such jobs file", file=sys.stderr)
        return ExitCode.USAGE
    # As `run` does: paths are relative to the jobs file's directory, inside the root.
    base = Path.cwd() if args.jobs == "-" else Path(args.jobs).resolve().parent

    async def body(redis: Any, keys: Any, settings: Settings, url: str) -> int:
        try:
            stream = open_jobs(args.jobs)
        except OSError as exc:
            print(f"dispatcher enqueue: {args.jobs}: {exc.strerror or exc}", file=sys.stderr)
            return ExitCode.USAGE
        root = args.attachments_root or settings.jobs.attachments_root or base
        try:
            composer = Composer(settings, base_dir=base, attachments_root=root, sign=False)
        except ValueError as exc:
            stream.close()
            print(f"dispatcher enqueue: {exc}", file=sys.stderr)
            return ExitCode.USAGE
        try:  # the suppression list: a job with no recipient left is recorded, not enqueued
            admission = Admission(open_store(settings.suppression, url), auto=False, source="enqueue")
            await asyncio.to_thread(admission.load)
        except StoreError as exc:
            stream.close()
            print(f"dispatcher enqueue: {exc}", file=sys.stderr)
            return ExitCode.USAGE
        enqueuer = Enqueuer(redis, keys, settings.redis.group, composer, admission)
        try:
            with stream:
                counts = await enqueuer.enqueue(stream)
        except RedisError as exc:
            print(f"dispatcher enqueue: {describe(exc, keys, settings.redis.group)}; {enqueuer.counts.added} jobs "
                  f"were added before it, enqueue the same file again to add the rest", file=sys.stderr)
            return ExitCode.USAGE
        # Invalid lines count whether recorded now or by an earlier enqueue of the file, as
        # a re-run of `run` counts them: the file still holds them.
        suppressed = f", {counts.suppressed} suppressed (every recipient listed)" if counts.suppressed else ""
        print(f"dispatcher enqueue: {counts.added} jobs added to {keys.stream}, {counts.invalid_lines} invalid "
              f"(in {keys.results}), {counts.already} already enqueued{suppressed}", file=sys.stderr)
        return ExitCode.FAILED if counts.invalid_lines else ExitCode.OK

    return _run("enqueue", args, body)


def worker(args: argparse.Namespace) -> int:
    from dispatcher.stream.worker import (
        Worker,
        WorkerOptions,
        default_claim_after,
        default_consumer,
    )

    async def body(redis: Any, keys: Any, settings: Settings, url: str) -> int:
        if args.metrics_port is not None:
            settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(
                update={"port": args.metrics_port})})
        root = args.attachments_root or getattr(getattr(settings, "jobs", None), "attachments_root", None) or Path.cwd()
        options = WorkerOptions(
            url=url,
            consumer=args.name or default_consumer(),
            group=settings.redis.group,
            claim_after=settings.redis.claim_after or default_claim_after(settings),
            max_deliveries=settings.redis.max_deliveries,
            attachments_root=Path(root),
            maildir=args.maildir,
            until_empty=args.until_empty,
        )
        return await Worker(redis, keys, settings, options).execute()

    return _run("worker", args, body)


def status(args: argparse.Namespace) -> int:
    from dispatcher.stream.report import status as read_status

    async def body(redis: Any, keys: Any, settings: Settings, url: str) -> int:
        report = await read_status(redis, keys, settings.redis.group)
        if args.json:
            sys.stdout.write(json.dumps(report.as_dict()) + "\n")
        else:
            sys.stdout.write(report.render())
        return ExitCode.OK

    return _run("status", args, body)


def results(args: argparse.Namespace) -> int:
    from dispatcher.stream.report import write_results

    async def body(redis: Any, keys: Any, settings: Settings, url: str) -> int:
        try:
            await write_results(redis, keys, sys.stdout.buffer)
            sys.stdout.flush()
        except BrokenPipeError:
            return ExitCode.OK  # `dispatcher results | head`
        return ExitCode.OK

    return _run("results", args, body)


def requeue(args: argparse.Namespace) -> int:
    from dispatcher.stream.requeue import requeue as move

    ids: set[str] | None = None
    if args.ids is not None:
        try:
            ids = {line.strip() for line in args.ids.read_text(encoding="utf-8").splitlines() if line.strip()}
        except (OSError, UnicodeDecodeError) as exc:
            print(f"dispatcher requeue: --ids {args.ids}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return ExitCode.USAGE

    async def body(redis: Any, keys: Any, settings: Settings, url: str) -> int:
        counts = await move(redis, keys, settings.redis.group, dead=args.dead or not args.invalid,
                            invalid=args.invalid, ids=ids)
        text = (f"dispatcher requeue: {counts.dead + counts.invalid} jobs back on {keys.stream} ({counts.dead} dead, "
                f"{counts.invalid} invalid)")
        if counts.forgotten:
            text += f"; {counts.forgotten} ids invalid at enqueue forgotten: enqueue the fixed file again to add them"
        print(text, file=sys.stderr)
        return ExitCode.OK

    return _run("requeue", args, body)


HANDLERS: dict[str, Callable[[argparse.Namespace], int]] = {
    "enqueue": enqueue, "worker": worker, "status": status, "results": results, "requeue": requeue,
}
