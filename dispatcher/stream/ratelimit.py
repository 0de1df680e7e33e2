"""``pool.rate_limit`` across workers: one GCRA token bucket kept in Redis."""

from __future__ import annotations

import asyncio

from redis.asyncio import Redis

from dispatcher.stream.scripts import RATE
from dispatcher.stream.store import retrying


class RedisRateLimiter:
    """At most ``rate`` acquisitions per second across every process that shares
    ``key`` on the same Redis, spaced evenly (a burst of one).

    Each ``acquire`` reserves the next free slot in one Lua script (GCRA on Redis's
    clock), then sleeps until it. Within a process, acquisitions go one at a time, so a
    process holds at most one slot ahead of now: a worker that stops wastes at most one
    slot, and never speeds anyone past ``rate``. While Redis is unavailable ``acquire``
    waits for it (cancel it to give up).
    """

    def __init__(self, redis: Redis, key: str, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = rate
        self.key = key
        self._interval_us = max(1, round(1_000_000 / rate))
        self._script = redis.register_script(RATE)
        self._lock = asyncio.Lock()

    async def acquire(self) -> None:
        async with self._lock:
            wait_us = await retrying(
                lambda: self._script(keys=[self.key], args=[self._interval_us]), what="rate limit"
            )
            if int(wait_us) > 0:
                await asyncio.sleep(int(wait_us) / 1_000_000)
