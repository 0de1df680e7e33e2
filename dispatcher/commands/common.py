"""What the commands share: the event loop they run on, and the way every Redis
command connects (one line, exit 2, when Redis cannot be used)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from dispatcher.config import ConfigError, Settings, load_settings
from dispatcher.exit import ExitCode
from dispatcher.observe.logs import configure_logging

URL_VARIABLE = "DISPATCHER_REDIS_URL"


def event_loop_runner() -> Callable[[Coroutine[Any, Any, int]], int]:
    """uvloop's ``run`` where it is installed, else asyncio's."""
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


def _redis_settings(args: argparse.Namespace, command: str) -> tuple[Settings, str, str] | int:
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


def redis_command(command: str, args: argparse.Namespace,
         body: Callable[[Any, Any, Settings, str], Awaitable[int]]) -> int:
    """Connect (exit 2 with one line naming the URL when Redis cannot be used), then run.
    A Redis error that waiting will not cure is one line too, exit 2."""
    from redis.exceptions import RedisError

    from dispatcher.stream.keys import Keys
    from dispatcher.stream.store import RedisUnavailable, check, check_types, client, describe

    prepared = _redis_settings(args, command)
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
        return event_loop_runner()(main())
    except RedisUnavailable as exc:
        print(f"dispatcher {command}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    except RedisError as exc:
        print(f"dispatcher {command}: {describe(exc, Keys(stream), settings.redis.group)}", file=sys.stderr)
        return ExitCode.USAGE
    except KeyboardInterrupt:
        return ExitCode.SIGNAL
