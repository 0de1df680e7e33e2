"""A bound on bytes held at once, shared by the pool's queue and the batch command's
admission: message size x queue length is what grows memory with large messages."""

from __future__ import annotations

import asyncio


class ByteBudget:
    """At most ``limit`` bytes held; ``acquire(n)`` waits for room. A request larger
    than the whole budget waits until nothing else is held, then goes alone, so
    that a single large message is never refused."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the byte budget must be at least 1")
        self.limit = limit
        self.held = 0
        self._freed = asyncio.Event()

    def __repr__(self) -> str:
        return f"<ByteBudget {self.held}/{self.limit}>"

    async def acquire(self, size: int) -> None:
        """Wait until ``size`` bytes fit, then hold them. Cancel-safe: a cancelled
        wait holds nothing."""
        while self.held and self.held + size > self.limit:
            self._freed.clear()
            await self._freed.wait()
        self.held += size

    def release(self, size: int) -> None:
        self.held -= size
        self._freed.set()
