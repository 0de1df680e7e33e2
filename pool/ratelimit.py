"""A rate limit shared by every worker of a pool."""

from __future__ import annotations

import asyncio
import time


class RateLimiter:
    """At most ``rate`` acquisitions per second across all callers, spaced evenly.

    Virtual scheduling (the GCRA form of a token bucket with a burst of one): each
    caller reserves the next free slot synchronously, then sleeps until it. No lock and
    no polling; a cancelled sleeper gives its slot up to nobody, which only slows the
    pool, never speeds it past ``rate``.
    """

    def __init__(self, rate: float) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.interval = 1.0 / rate
        self._next = 0.0

    def reserve(self) -> float:
        """Reserve the next slot; return how long to wait for it (seconds, >= 0)."""
        now = time.monotonic()
        slot = max(now, self._next)
        self._next = slot + self.interval
        return slot - now

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)
