"""What the engine is plugged into: a ``Source`` of jobs and a ``Ledger`` that judges
and records them (the jobs file and its results file for ``run``; the Redis stream
for ``worker``). The engine only sees ``Delivery`` values, one per job, and settles
each with one ``Outcome``."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from dispatcher.compose.jobs import JobError, Outgoing
from dispatcher.compose.stage import AnyJob
from dispatcher.engine.outcome import Outcome


@dataclass(slots=True)
class Delivery:
    """One job on its way through the engine, in one of four states: not a job
    (``error``), done before (``done``), parsed (``job``: the engine composes it) or
    composed (``outgoing``)."""

    line: int
    job_id: str | None
    size: int  # bytes of its line: what the progress bar counts
    job: AnyJob | None = None
    outgoing: Outgoing | None = None
    error: JobError | None = None
    parsed: bool = False  # with ``error``: a valid job (its id is its own) that failed later
    done: bool = False  # the source found it finished already (the compose process, the stream's done ids)
    retry: bool = False  # ``--retry-failed``: only the recipients an earlier run left to retry
    held: int = 0  # message bytes it holds of the engine's budget
    lease: Callable[[], bool] | None = None  # asked before it goes on the wire: False withdraws it
    token: Any = None  # the source's own handle (a stream entry)
    settled: bool = False  # the ledger has its outcome


class Verdict(enum.Enum):
    """The ledger's answer for a delivery, before anything is composed or sent."""

    SEND = "send"
    RETRY = "retry"  # send to the recipients ``Ledger.to_retry`` gives
    SKIP = "skip"  # finished before: counted, not recorded again
    DUPLICATE = "duplicate"  # an earlier line owns its id: recorded invalid (``Delivery.error`` says why)
    INVALID = "invalid"  # not a job: recorded invalid


class Halt(Exception):
    """A source or ledger cannot go on (the jobs file unreadable, the results file
    unwritable, the compose process gone): the engine stops as on a signal, with
    ``code`` as the exit status and ``message`` said once."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Source(Protocol):
    def batches(self) -> AsyncGenerator[Sequence[Delivery], None]:
        """The jobs, in batches, in order. Raises Halt when it cannot go on."""
        ...

    def close(self) -> None:
        ...


class Ledger(Protocol):
    def admit(self, delivery: Delivery) -> Verdict:
        """Judge a delivery by its id (resume, duplicates). Raises Halt."""
        ...

    def to_retry(self, delivery: Delivery, recipients: list[str]) -> list[str]:
        """Of ``recipients``, those a ``RETRY`` delivery sends to."""
        ...

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """Record how the delivery ended. Raises Halt when it cannot be recorded."""
        ...

    async def confirm(self, delivery: Delivery) -> bool:
        """The delivery's lease lapsed before it went on the wire: True when it may
        still be sent (its lease renewed); False when it was settled or dropped."""
        ...
