"""The pool's sending rate: a cap shared by every worker, lowered when the relay
says "slow down" and raised again while it stays quiet (docs/library.md promises 9 and 12)."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Protocol

#: Halve at most this often: the workers of one pool often hear the same throttling
#: reply several times in a burst, which is one signal, not several.
MIN_CUT_INTERVAL = 1.0
#: Each quiet second gives back this share of the cap (or of the highest rate seen).
RECOVERY_SHARE = 0.10


class SharedLimiter(Protocol):
    """A rate limit kept outside this process (e.g. in Redis, for many workers)."""

    async def acquire(self) -> None: ...


class RateLimiter:
    """At most ``current`` sends per second across all callers, spaced evenly.

    Virtual scheduling (the GCRA form of a token bucket with a burst of one): each
    caller reserves the next free slot synchronously, then sleeps until it. No lock and
    no polling; a cancelled sleeper gives its slot up to nobody, which only slows the
    pool, never speeds it past the rate.

    ``throttled()`` halves the current rate (multiplicative decrease); every second
    without one adds back ``RECOVERY_SHARE`` of ``limit`` — or, with no limit, of the
    highest rate measured — up to ``limit`` (or back to unlimited).
    """

    def __init__(self, limit: float | None) -> None:
        if limit is not None and limit <= 0:
            raise ValueError("rate must be positive")
        self.limit = limit
        self.current = limit if limit is not None else math.inf
        self._next = 0.0
        self._cut = -MIN_CUT_INTERVAL  # when current was last halved
        self._step = 0.0  # when the last quiet second was counted
        self._window = 0.0  # start of the one-second window being counted
        self._count = 0
        self._highest = 0.0  # sends in the busiest whole second seen

    @property
    def interval(self) -> float:
        return 0.0 if self.current == math.inf else 1.0 / self.current

    def reserve(self) -> float:
        """Reserve the next slot; return how long to wait for it (seconds, >= 0)."""
        now = time.monotonic()
        if now - self._window >= 1.0:
            self._highest = max(self._highest, self._count / max(1.0, now - self._window))
            self._window, self._count = now, 0
        self._count += 1
        if self.current != self.limit and self.current != math.inf:
            self._recover(now)
        if self.current == math.inf:
            return 0.0
        slot = max(now, self._next)
        self._next = slot + 1.0 / self.current
        return slot - now

    async def acquire(self) -> None:
        delay = self.reserve()
        if delay > 0:
            await asyncio.sleep(delay)

    def throttled(self) -> bool:
        """A reply asked us to slow down: halve the rate. Returns True if it moved."""
        now = time.monotonic()
        if now - self._cut < MIN_CUT_INTERVAL and self.current != math.inf:
            return False
        base = self.current
        if base == math.inf:
            # Unlimited so far: halve what we were actually sending.
            measured = self._count / max(now - self._window, 0.01)
            base = max(self._highest, measured, 1.0)
        self.current = max(base / 2, 0.1)
        self._cut = self._step = now
        return True

    def _recover(self, now: float) -> None:
        quiet = int(now - self._step)
        if quiet < 1:
            return
        ceiling = self.limit if self.limit is not None else max(self._highest, self.current)
        self.current = min(self.current + quiet * RECOVERY_SHARE * ceiling, ceiling)
        self._step += quiet
        if self.limit is None and self.current >= ceiling:
            self.current = math.inf
