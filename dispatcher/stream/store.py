"""The connection to Redis: a client, one check at start, retrying while Redis restarts,
and the results-file row the stream records."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from dispatcher.journal import encode_result
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


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (userinfo and ``?password=``)."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            host = netloc.rpartition("@")[2]
            netloc = f"{parts.username or ''}:***@{host}"
        query = parts.query
        if query:
            pairs = parse_qsl(query, keep_blank_values=True)
            query = urlencode([(k, "***" if "password" in k.lower() else v) for k, v in pairs], safe="*")
        return urlunsplit(parts._replace(netloc=netloc, query=query))
    except ValueError:
        return "<the Redis URL>"


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


async def ensure_group(redis: Redis, keys: Keys, group: str) -> None:
    """Create the stream and its consumer group (from the first entry) unless they exist."""
    try:
        await redis.xgroup_create(keys.stream, group, id="0", mkstream=True)
    except redis_errors.ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


async def retrying(
    op: Callable[[], Awaitable[T]], *, what: str, stop: asyncio.Event | None = None, max_delay: float = 2.0,
    on_back: Callable[[], None] | None = None,
) -> T:
    """Run ``op`` until Redis answers, backing off (full jitter, 50 ms doubling to
    ``max_delay``) while it is unavailable; ``on_back()`` runs when it answers again.
    With ``stop`` set, raises Stopped instead of waiting again. Other Redis errors
    propagate."""
    delay = 0.05
    down_since: float | None = None
    while True:
        try:
            result = await op()
        except UNAVAILABLE as exc:
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


def result_row(
    job_id: str | None,
    line: int,
    status: str,
    *,
    attempts: int = 0,
    code: int | None = None,
    response: str | None = None,
    refused: dict[str, list[Any]] | None = None,
    error: str | None = None,
    elapsed_ms: float = 0,
) -> bytes:
    """One row of the results file (SPEC section 2), as bytes, encoded as ``run`` does."""
    row = {"id": job_id, "line": line, "status": status, "attempts": attempts, "code": code,
           "response": response, "refused": refused or {}, "error": error, "elapsed_ms": elapsed_ms}
    return encode_result(row).rstrip(b"\n")
