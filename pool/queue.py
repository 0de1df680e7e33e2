"""The jobs waiting for a slot: at most ``maxsize`` new ones (``put`` waits for room),
and any number coming back (``put_back``: a job back from a failed connect or a backoff
never waits, and goes in line only while there is room, else ahead of the new ones).

asyncio.Queue does the same in a dozen Python calls per job; this does it in two.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

from pool.slot import Job


class JobQueue:
    """FIFO of jobs; ``get`` waits for one, ``put`` for room. Cancel-safe: a cancelled
    waiter takes nothing and hands its wake-up on."""

    __slots__ = ("_back", "_getters", "_jobs", "_putters", "maxsize")

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._jobs: deque[Job] = deque()  # in line, at most maxsize of them
        self._back: deque[Job] = deque()  # came back while the line was full: served first
        self._getters: deque[asyncio.Future[None]] = deque()
        self._putters: deque[asyncio.Future[None]] = deque()

    def __len__(self) -> int:
        return len(self._jobs) + len(self._back)

    def __bool__(self) -> bool:
        return bool(self._jobs or self._back)

    def full(self) -> bool:
        return len(self._jobs) >= self.maxsize

    def put_nowait(self, job: Job) -> None:
        """In line now (the caller checked ``full()``, or the job comes back)."""
        self._jobs.append(job)
        if self._getters:
            _wake(self._getters)

    async def put(self, job: Job) -> None:
        """In line once there is room."""
        while len(self._jobs) >= self.maxsize:
            await _wait(self._putters, lambda: len(self._jobs) < self.maxsize)
        self.put_nowait(job)

    def put_back(self, job: Job) -> None:
        """In line without waiting for room (its room was given back when taken)."""
        if len(self._jobs) < self.maxsize:
            self.put_nowait(job)
        else:
            self._back.append(job)
            if self._getters:
                _wake(self._getters)

    def take(self) -> Job:
        """The next job; the queue must not be empty."""
        if self._back:
            return self._back.popleft()
        job = self._jobs.popleft()
        if self._putters:
            _wake(self._putters)
        return job

    async def get(self) -> Job:
        """The next job, once there is one."""
        while not (self._jobs or self._back):
            await _wait(self._getters, self.__bool__)
        return self.take()

    def drain(self) -> list[Job]:
        """Every job waiting, now out of the queue; submits waiting for room get it."""
        jobs = [*self._back, *self._jobs]
        self._back.clear()
        self._jobs.clear()
        while self._putters:
            _wake(self._putters)
        return jobs


def _wake(waiters: deque[asyncio.Future[None]]) -> None:
    while waiters:
        waiter = waiters.popleft()
        if not waiter.done():
            waiter.set_result(None)
            return


async def _wait(waiters: deque[asyncio.Future[None]], ready: Callable[[], bool]) -> None:
    """Wait to be woken. Cancelled after a wake-up, the wake-up goes to the next
    waiter (``ready()`` says whether there is still something to wake for)."""
    waiter = asyncio.get_running_loop().create_future()
    waiters.append(waiter)
    try:
        await waiter
    except BaseException:
        waiter.cancel()
        try:
            waiters.remove(waiter)
        except ValueError:
            pass
        if not waiter.cancelled() and ready():
            _wake(waiters)
        raise
