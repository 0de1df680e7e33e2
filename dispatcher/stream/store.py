"""The connection to Redis: a client, one check at start, retrying while Redis restarts,
and the results-file row the stream records."""

from __future__ import annotations

import asyncio
import random
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from dispatcher.batch.journal import encode_result
from dispatcher.engine.outcome import result_row
from dispatcher.stream.keys import Keys

log = structlog.get_logger("dispatcher.redis")

#: Errors that mean "Redis is not there right now": refused or dropped connections,
#: timeouts, and a restarted server still loading its AOF (BusyLoadingError).
UNAVAILABLE = (redis_errors.ConnectionError, redis_errors.TimeoutError)

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis cannot be used at start; the message names the URL without its password."""


class Stopped(Exception):
    """Raised instead of waiting any longer for Redis once the caller is stopping."""


#: What each key must hold; "none" (not there yet) is always fine.
KEY_TYPES = {"stream": "stream", "results": "stream", "dead": "stream", "invalid": "stream", "ids": "hash",
             "lines": "set", "done": "hash", "stats": "hash", "errors": "hash", "rate": "string"}


def out_of_memory(exc: BaseException) -> bool:
    """Redis refused a write at ``maxmemory`` (OOM): it frees memory only when someone
    deletes something, but it will take writes again then, like a Redis come back."""
    # redis-py takes the "OOM" prefix off the reply (OutOfMemoryError); a script's error keeps it.
    return isinstance(exc, redis_errors.OutOfMemoryError) or (
        isinstance(exc, redis_errors.ResponseError) and "command not allowed when used memory" in str(exc))


def describe(exc: redis_errors.RedisError, keys: Keys, group: str) -> str:
    """One line for a Redis error that waiting will not cure (a deleted stream or group,
    a key of another type, missing permissions), naming the key or the command."""
    text = one_line(exc)
    if "NOGROUP" in text or "UNBLOCKED" in text:
        return (f"the stream {keys.stream} or its group {group} is gone (deleted, FLUSHALL, or Redis restarted "
                f"without its AOF): {text}")
    if out_of_memory(exc):
        return f"Redis is out of memory (maxmemory): {text}"
    if isinstance(exc, redis_errors.NoPermissionError):
        return f"the Redis user lacks a permission dispatcher needs (scripting, streams, hashes): {text}"
    return f"Redis refused: {text}"


def redact(url: str) -> str:
    """``url`` with everything before its host's ``@`` (user and password) and any
    ``password=`` parameter replaced by ``***``. Whatever the URL's shape (no colon before
    the password, a typo in the scheme), it errs on hiding too much."""
    scheme = re.match(r"[A-Za-z][A-Za-z0-9+.\-]*:/*", url)
    head = scheme.group(0) if scheme else ""
    rest = url[len(head):]
    if "@" in rest:
        rest = "***@" + rest.rpartition("@")[2]
    return head + re.sub(r"(?i)(password=)[^&#]*", r"\1***", rest)


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text


def client(url: str) -> Redis:
    """A client for ``url``; retrying is ours (``retrying``), not redis-py's. Raises
    RedisUnavailable for a URL redis-py cannot use."""
    try:
        return Redis.from_url(
            url,
            socket_connect_timeout=5,
            socket_timeout=15,  # longer than any BLOCK we use
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
            protocol=2,  # the reply shapes this package reads, whatever redis-py's default
        )
    except (ValueError, TypeError) as exc:
        raise RedisUnavailable(f"bad Redis URL {redact(url)}: {one_line(exc)}") from None


async def check(redis: Redis, url: str) -> None:
    """PING once. Raises RedisUnavailable with one line naming the URL (no password)."""
    try:
        await redis.ping()
    except (redis_errors.RedisError, OSError) as exc:
        raise RedisUnavailable(f"cannot use Redis at {redact(url)}: {one_line(exc)}") from None


async def check_types(redis: Redis, keys: Keys) -> None:
    """Raise RedisUnavailable naming the first key that holds another type than ours
    (another program uses the name)."""
    names = {field: getattr(keys, field) for field in KEY_TYPES}
    async with redis.pipeline(transaction=False) as pipe:
        for name in names.values():
            pipe.type(name)
        found = await pipe.execute()
    for (field, name), kind in zip(names.items(), found, strict=True):
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        if kind not in ("none", KEY_TYPES[field]):
            raise RedisUnavailable(f"{name} holds a {kind}, not a {KEY_TYPES[field]}: another program uses this "
                                   f"name; pick another --stream")


async def ensure_group(redis: Redis, keys: Keys, group: str) -> None:
    """Create the stream and its consumer group (from the first entry) unless they exist."""
    try:
        await redis.xgroup_create(keys.stream, group, id="0", mkstream=True)
    except redis_errors.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def retrying(
    op: Callable[[], Awaitable[T]], *, what: str, stop: asyncio.Event | None = None, max_delay: float = 2.0,
    on_back: Callable[[], None] | None = None, wait_out_of_memory: bool = True,
) -> T:
    """Run ``op`` until Redis answers, backing off (full jitter, 50 ms doubling to
    ``max_delay``) while it is unavailable or, with ``wait_out_of_memory``, refusing
    writes at ``maxmemory``; ``on_back()`` runs when it answers again. With ``stop``
    set, raises Stopped instead of waiting again. Other Redis errors propagate."""
    delay = 0.05
    down_since: float | None = None
    while True:
        try:
            result = await op()
        except (*UNAVAILABLE, redis_errors.ResponseError) as exc:
            if isinstance(exc, redis_errors.ResponseError) and not (wait_out_of_memory and out_of_memory(exc)):
                raise
            if down_since is None:
                down_since = time.monotonic()
                log.warning("redis.unavailable", doing=what, error=one_line(exc))
            if stop is not None and stop.is_set():
                raise Stopped from None
            pause = random.uniform(delay / 2, delay)
            if stop is None:
                await asyncio.sleep(pause)
            else:
                try:
                    async with asyncio.timeout(pause):
                        await stop.wait()
                except TimeoutError:
                    pass
            delay = min(max_delay, delay * 2)
            continue
        if down_since is not None:
            log.info("redis.back", doing=what, down_s=round(time.monotonic() - down_since, 3))
            if on_back is not None:
                on_back()
        return result


def encoded_row(job_id: str | None, line: int, status: str, **fields: Any) -> bytes:
    """One row of results (``dispatcher.engine.outcome.result_row``), as bytes, encoded
    as the results file is."""
    return encode_result(result_row(job_id, line, status, **fields)).rstrip(b"\n")
