"""The Redis stream as the engine's ledger: each entry a worker holds is settled by
one script (SETTLE: result row + id done + XACK), in batches:

- sent, permanently failed, invalid, suppressed: recorded and acknowledged (F); an
  id found done already is acknowledged only;
- a transient failure (4xx outlasting ``retry.max_attempts``): deferred (D) — back to
  the end of the stream at once with its reason, this delivery counted; after
  ``max_deliveries`` such deliveries it goes to the dead stream with that reason;
- never sent (stopping, pool closed, relay refused): released (R) — back to the end of
  the stream at once, for any worker, without counting a delivery.

A lapsed lease is confirmed (CONFIRM: still ours? id not done?) before sending.
"""

from __future__ import annotations

import asyncio
import time
from functools import partial
from typing import Any

import structlog
from redis import exceptions as redis_errors

from dispatcher.engine.outcome import UNSENT, Outcome
from dispatcher.engine.ports import Delivery, Verdict
from dispatcher.stream.scripts import CONFIRM, SETTLE
from dispatcher.stream.source import MAX_BATCH, Entry, Hold, Settle
from dispatcher.stream.store import Stopped, encoded_row, retrying

log = structlog.get_logger("dispatcher.worker")

COMMITS = 4  # settle scripts in flight at once


class StreamLedger:
    def __init__(self, hold: Hold, *, max_deliveries: int) -> None:
        self.hold = hold
        self.max_deliveries = max_deliveries
        self._settle_script = hold.redis.register_script(SETTLE)
        self._confirm_script = hold.redis.register_script(CONFIRM)

    def admit(self, delivery: Delivery) -> Verdict:
        """Every id on the stream is unique (enqueue sees to it): only one found done
        already (a redelivery) is skipped."""
        if delivery.done:
            return Verdict.SKIP
        return Verdict.INVALID if delivery.error is not None else Verdict.SEND

    def to_retry(self, delivery: Delivery, recipients: list[str]) -> list[str]:
        return recipients

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        entry: Entry = delivery.token
        hold, status = self.hold, outcome.status
        if status == UNSENT:
            hold.settle(b"R", entry)  # never on the wire: back to the stream for any worker
        elif status == "skipped":
            hold.counts.skipped += 1
            hold.settle(b"F", entry)  # status '': acknowledge only
        elif status == "failed" and outcome.transient:
            hold.counts.deferred += 1
            error = outcome.fields.get("error") or ""
            log.info("job.deferred", id=entry.job_id, deliveries=entry.deliveries, error=error)
            hold.settle(b"D", entry, payload=error.encode("utf-8", "replace"))
        else:
            setattr(hold.counts, status, getattr(hold.counts, status) + 1)
            hold.settle(b"F", entry, status.encode(), encoded_row(entry.job_id, entry.line, status, **outcome.fields))

    async def confirm(self, delivery: Delivery) -> bool:
        """The entry's lease lapsed before it went on the wire: True when it is still
        ours and its id not done (its lease starts again); otherwise it is settled or
        dropped here and False is returned."""
        entry: Entry = delivery.token
        hold = self.hold
        if entry.lost:
            self._drop(entry)
            return False
        sent = time.monotonic()
        keys = [hold.keys.stream, hold.keys.done]
        args: list[Any] = [hold.group, hold.consumer, entry.entry_id, entry.job_id]
        try:
            verdict = int(await hold.call(lambda: self._confirm_script(keys=keys, args=args), "confirm"))
        except Stopped:
            hold.settle(b"R", entry)
            return False
        if verdict == 1:
            entry.lease_until = sent + hold.lease
            return True
        if verdict == 2:
            hold.counts.skipped += 1
            hold.settle(b"F", entry)  # done meanwhile, still ours: acknowledge only
        else:
            self._drop(entry)
        return False

    def _drop(self, entry: Entry) -> None:
        """Another worker claimed the entry while this one was paused: leave it to them."""
        hold = self.hold
        hold.counts.lost += 1
        log.warning("job.claimed_by_another", id=entry.job_id, consumer=hold.consumer)
        hold.entries.pop(entry.entry_id, None)
        hold.room.set()

    # -- recording --

    async def finisher(self) -> None:
        """Commit settles in batches, one script call each, retrying while Redis is away
        (the script is idempotent), until a None is queued. Up to COMMITS batches are in
        flight at once, so that a message accepted by the relay waits one Redis round
        trip (fsync included) to be recorded, not two: what a killed worker had accepted
        but not recorded is sent again. A slot is free only once its settle is committed."""
        settles = self.hold.settles
        room = asyncio.Semaphore(COMMITS)
        async with asyncio.TaskGroup() as commits:
            last = False
            while not last:
                item = await settles.get()
                if item is None:
                    return
                # Batch what comes while a commit slot frees, and what the same turn of
                # the loop settles (one read of replies resolves several messages).
                await room.acquire()
                await asyncio.sleep(0)
                batch = [item]
                while len(batch) < MAX_BATCH and not settles.empty():
                    following = settles.get_nowait()
                    if following is None:
                        last = True
                        break
                    batch.append(following)
                commits.create_task(self._commit(batch, room))

    async def _commit(self, batch: list[Settle], room: asyncio.Semaphore) -> None:
        hold = self.hold
        k = hold.keys
        keys = [k.stream, k.results, k.done, k.stats, k.errors, k.finished, k.dead, k.invalid]
        args: list[Any] = [hold.group, hold.consumer, self.max_deliveries]
        for s in batch:
            args += [s.kind, s.entry.entry_id, s.entry.job_id, s.status, s.payload]
        try:
            await retrying(partial(self._settle_script, keys=keys, args=args), what="record results",
                           on_back=hold.redis_back)
        except redis_errors.ResponseError as exc:
            hold.refuse(exc, "record results")  # not recorded: these jobs may be sent again
        finally:
            room.release()
        for s in batch:
            hold.entries.pop(s.entry.entry_id, None)
        hold.room.set()
