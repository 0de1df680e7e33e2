"""A message in the pool (``Job``) and a slot: a session and the messages it holds.

A slot holds at most one job taken from the queue and not yet on the wire (``held``)
and the transactions on its wire, oldest first (``window``: two when DATA-pipelined,
up to ``pipeline_depth`` with BDAT). Whatever stops the slot's worker, every job the
slot holds is ended (``release``): none is lost, none waits for ever.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pool.errors import PoolError, Refusals

if TYPE_CHECKING:
    from pool.connection import Connection
    from pool.envelope import Envelope
    from pool.log import EventLogger
    from pool.results import SendResult
    from pool.transaction import Transaction


@dataclass(slots=True, eq=False)
class Job:
    """One submitted message. Its state changes only in the worker of the slot that
    holds it, or where it ends (``SMTPPool._finish``)."""

    envelope: Envelope
    future: asyncio.Future[SendResult]
    submitted: float
    pending: tuple[str, ...]
    accepted: list[str] = field(default_factory=list)
    refused: Refusals = field(default_factory=dict)
    attempts: int = 0
    last_code: int | None = None
    last_response: str = ""
    delivered: tuple[int, str] | None = None  # the end-of-DATA reply that accepted it
    taken: bool = False  # a worker took it from the queue: its caller can no longer unsend it
    stop_reason: PoolError | None = None  # why its backoff timer was cancelled
    deferred: Refusals = field(default_factory=dict)  # the 4xx each pending recipient last got
    maybe_delivered: bool = False  # an attempt was lost after the end of DATA (ambiguous)
    admit: Callable[[], bool] | None = None  # asked right before each attempt goes on the wire


#: A transaction on the wire: its job, itself, and when it started (``time.monotonic()``).
InFlight = tuple[Job, "Transaction", float]


class Slot:
    """One of the pool's ``size`` places: a ``Connection`` and the jobs it holds."""

    __slots__ = ("connection", "held", "log", "window")

    def __init__(self, connection: Connection, log: EventLogger) -> None:
        self.connection = connection
        self.log = log
        self.held: Job | None = None  # taken from the queue, not yet on the wire
        self.window: deque[InFlight] = deque()  # on the wire, oldest first

    def __repr__(self) -> str:
        return f"<Slot {self.connection!r} held={self.held is not None} in_flight={len(self.window)}>"

    @property
    def is_busy(self) -> bool:
        """Holds a job, or a transaction whose replies are not all read."""
        return self.held is not None or bool(self.window)

    def release(self) -> list[Job]:
        """Every job the slot holds, which it holds no more (its worker stopped)."""
        jobs = [] if self.held is None else [self.held]
        jobs += [job for job, _, _ in self.window]
        self.held = None
        self.window.clear()
        return jobs

    def unhold(self) -> Job:
        """The held job, which the slot holds no more (failed, or back in the queue)."""
        job = self.held
        assert job is not None, "the slot holds no job"
        self.held = None
        return job
