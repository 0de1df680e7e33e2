"""``dispatcher enqueue``: validate a jobs file and append its jobs to a Redis stream."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

from dispatcher.commands.common import redis_command
from dispatcher.config import Settings
from dispatcher.exit import ExitCode


def main(args: argparse.Namespace) -> int:
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

    return redis_command("enqueue", args, body)
