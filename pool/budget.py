"""A bound on bytes held at once, shared by the pool's queue and the batch command's
admission: message size x queue length is what grows memory with large messages."""

from __future__ import annotations

import asyncio
from collections import deque


class ByteBudget:
    """At most ``limit`` bytes held; ``acquire(n)`` waits for room, first come first
    served (a large request is never overtaken for ever by small ones). A request
    larger than the whole budget waits until nothing else is held, then goes alone,
    so that a single large message is never refused. Cancel-safe: a cancelled wait
    holds nothing."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("the byte budget must be at least 1")
        self.limit = limit
        self.held = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def __repr__(self) -> str:
        return f"<ByteBudget {self.held}/{self.limit}>"

    def _fits(self, size: int) -> bool:
        return not self.held or self.held + size <= self.limit

    def take(self, size: int) -> bool:
        """Hold ``size`` bytes now if they fit and nobody waits before; else False
        (then ``acquire`` waits for them). No coroutine: the usual case costs a call."""
        held = self.held
        if not self._waiters and (not held or held + size <= self.limit):  # _fits, inline: once per message
            self.held = held + size
            return True
        return False

    async def acquire(self, size: int) -> None:
        if not self._waiters and self._fits(size):
            self.held += size
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (size, future)
        self._waiters.append(entry)
        try:
            await future
        except BaseException:
            if future.done() and not future.cancelled():
                self.held -= size  # granted just as it was cancelled: give it back
            else:
                self._waiters.remove(entry)
            self._wake()
            raise

    def release(self, size: int) -> None:
        self.held -= size
        if self._waiters:
            self._wake()

    def _wake(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            size, future = self._waiters.popleft()
            if not future.done():
                self.held += size
                future.set_result(None)
