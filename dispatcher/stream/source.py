"""The Redis stream as the engine's source: what one worker reads, claims and holds.

An entry is *held* from the moment this worker reads or claims it until its settle is
committed (``dispatcher.stream.ledger``); the worker holds at most ``slots`` entries
and keeps their idle time fresh (TOUCH), so that no other worker claims what a live
worker is still sending. Entries of a dead worker go idle and are claimed
(XAUTOCLAIM) after ``redis.claim_after``.

Each held entry carries a *lease*: half of ``claim_after`` from the moment the request
that last reset its idle time was sent. The pool asks the lease right before the job
goes on the wire; a worker that was paused (SIGSTOP, a long GC) finds its leases
lapsed and the ledger asks Redis (CONFIRM) whether each entry is still its own and
its id not done before sending it, so it never sends what another worker claimed
meanwhile.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import structlog
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from dispatcher.compose.jobs import JobError, Line, Outgoing
from dispatcher.compose.stage import Composer, Ready
from dispatcher.engine.ports import Delivery
from dispatcher.stream.keys import Keys
from dispatcher.stream.scripts import FORGET, NAME, PRUNE, TAKE, TOUCH, UNNAME
from dispatcher.stream.store import Stopped, describe, out_of_memory, retrying

log = structlog.get_logger("dispatcher.worker")

T = TypeVar("T")

MAX_BATCH = 256  # entries per read or claim, and settles per script call
PRUNE_EVERY = 60.0


@dataclass(slots=True)
class Entry:
    entry_id: bytes
    job_id: str
    line: int
    job: bytes | None
    deliveries: int
    lease_until: float = 0.0  # monotonic: until then no other worker can have claimed it
    lost: bool = False  # a touch found it claimed by another worker
    settling: bool = False  # its settle is queued: no longer touched

    def admitted(self) -> bool:
        return not self.lost and time.monotonic() < self.lease_until


@dataclass(slots=True)
class Settle:
    kind: bytes  # F finished, D deferred, R released
    entry: Entry
    status: bytes = b""
    payload: bytes = b""


@dataclass
class WorkerCounts:
    sent: int = 0
    failed: int = 0
    invalid: int = 0
    suppressed: int = 0  # every recipient on the suppression list: not sent
    skipped: int = 0  # already done when read
    deferred: int = 0
    released: int = 0
    lost: int = 0  # claimed by another worker while this one was paused: not sent

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Hold:
    """What one worker holds of the stream, shared by its source and its ledger: the
    entries (each until its settle is committed), the settles waiting to be committed,
    its counts, and whether and why it stops."""

    redis: Redis
    keys: Keys
    group: str
    consumer: str
    claim_after: float  # seconds
    slots: int
    entries: dict[bytes, Entry] = field(default_factory=dict)
    settles: asyncio.Queue[Settle | None] = field(default_factory=asyncio.Queue)
    counts: WorkerCounts = field(default_factory=WorkerCounts)
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # a signal, a relay failure, Redis refusing
    room: asyncio.Event = field(default_factory=asyncio.Event)  # a slot was freed (or we are stopping)
    refused: str | None = None  # Redis refused a command for good (one line): why
    next_claim: float = 0.0  # monotonic: claim idle entries from then on

    @property
    def lease(self) -> float:
        return self.claim_after / 2

    def stop(self) -> None:
        self.stopping.set()
        self.room.set()

    def settle(self, kind: bytes, entry: Entry, status: bytes = b"", payload: bytes = b"") -> None:
        if kind == b"R":
            self.counts.released += 1
        entry.settling = True
        self.settles.put_nowait(Settle(kind, entry, status, payload))

    async def call(self, op: Callable[[], Awaitable[T]], what: str) -> T:
        """``op`` through ``retrying``; Stopped when stopping while Redis is away, or when
        Redis refuses it for good (then the worker stops, exit 2)."""
        try:
            return await retrying(op, what=what, stop=self.stopping, on_back=self.redis_back)
        except redis_errors.ResponseError as exc:
            self.refuse(exc, what)
            raise Stopped from None

    def refuse(self, exc: redis_errors.RedisError, what: str) -> None:
        """Redis refused a command for good (a deleted stream or group, a key of another
        type, a permission): stop. What is held is handed back (if Redis lets us)."""
        if self.refused is None:
            self.refused = describe(exc, self.keys, self.group)
            log.error("worker.redis_refused", doing=what, error=self.refused)
        self.stop()

    def redis_back(self) -> None:
        """Redis was away (restarting?): every worker's touches failed meanwhile, so the
        entries of live workers look idle. Claim nothing until each has had claim_after
        to touch its entries again; a worker that died meanwhile is claimed after that."""
        self.next_claim = max(self.next_claim, time.monotonic() + self.claim_after)


class StreamSource:
    """Reads the stream for the engine: this worker's own pending entries first (a
    restart), then idle entries of others (claims) and new ones (XREADGROUP), a batch
    whenever a quarter of the slots is free. Jobs are composed in a thread, through the
    compose stage ``run`` uses; the composer reads a path only under the worker's
    attachments root (jobs come from the network)."""

    def __init__(self, hold: Hold, composer: Composer, *, max_deliveries: int, until_empty: bool) -> None:
        self.hold = hold
        self.composer = composer
        self.max_deliveries = max_deliveries
        self.until_empty = until_empty
        self._read_at = max(1, hold.slots // 4)
        self._claim_ms = max(1, round(hold.claim_after * 1000))
        self._claim_every = min(max(hold.claim_after / 2, 0.05), 10.0)
        self._claim_start = "0-0"
        self._take = hold.redis.register_script(TAKE)

    def close(self) -> None:
        pass  # the entries it read are the ledger's to settle

    async def batches(self) -> AsyncGenerator[list[Delivery], None]:
        hold = self.hold
        try:
            start = "-"
            while start and not hold.stopping.is_set():  # a restarted worker's own entries first
                if not await self._wait_room():
                    return
                start, entries = await self._take_entries("own", start)
                yield await self._deliveries(entries)
            while not hold.stopping.is_set():
                if not await self._wait_room():
                    return
                entries = await self._claim_idle()
                if not entries:
                    block = max(1, min(500, round((hold.next_claim - time.monotonic()) * 1000)))
                    entries = await self._read_new(block)
                if entries:
                    yield await self._deliveries(entries)
                elif self.until_empty and await self._empty():
                    log.info("worker.empty", consumer=hold.consumer)
                    return
        except Stopped:
            return

    async def _wait_room(self) -> bool:
        """Wait until a quarter of the slots are free (a read fetches a batch worth its
        round trip, while the pool still has three quarters to send); False when
        stopping instead."""
        hold = self.hold
        while hold.slots - len(hold.entries) < self._read_at and not hold.stopping.is_set():
            hold.room.clear()
            await hold.room.wait()
        return not hold.stopping.is_set()

    def _room_left(self) -> int:
        return max(1, min(MAX_BATCH, self.hold.slots - len(self.hold.entries)))

    async def _claim_idle(self) -> list[Entry]:
        """Entries idle for claim_after (their worker died), when it is time to look."""
        now = time.monotonic()
        if now < self.hold.next_claim:
            return []
        cursor, entries = await self._take_entries("idle", self._claim_start)
        self._claim_start = cursor or "0-0"
        if not cursor:
            self.hold.next_claim = now + self._claim_every
        return entries

    async def _take_entries(self, mode: str, start: str) -> tuple[str, list[Entry]]:
        hold = self.hold
        keys = [hold.keys.stream, hold.keys.dead, hold.keys.errors, hold.keys.stats]
        args: list[Any] = [hold.group, hold.consumer, mode, self._claim_ms, self._room_left(),
                           self.max_deliveries, start]
        sent = time.monotonic()

        def entries_of(reply: Any) -> list[Entry]:
            return [_entry(entry_id, fields, int(n), sent + hold.lease) for entry_id, fields, n in reply[1]]

        reply = await self._taking(hold.call(lambda: self._take(keys=keys, args=args), f"claim ({mode})"),
                                   entries_of)
        cursor, entries = reply[0], entries_of(reply)
        if entries:
            log.info("worker.claimed" if mode == "idle" else "worker.took_back", consumer=hold.consumer,
                     entries=len(entries))
        return cursor.decode() if isinstance(cursor, bytes) else str(cursor), entries

    async def _read_new(self, block_ms: int) -> list[Entry]:
        hold = self.hold
        sent = time.monotonic()

        def entries_of(reply: Any) -> list[Entry]:
            return [_entry(entry_id, _flat(fields), None, sent + hold.lease)
                    for _stream, items in reply or [] for entry_id, fields in items]

        reply: Any = await self._taking(hold.call(
            lambda: hold.redis.xreadgroup(hold.group, hold.consumer, {hold.keys.stream: ">"},
                                          count=self._room_left(), block=block_ms),
            "read"), entries_of)
        return entries_of(reply)

    async def _taking(self, read: Awaitable[T], entries_of: Callable[[T], list[Entry]]) -> T:
        """``read`` (a read or a claim: Redis makes its entries this consumer's as it
        runs). Cancelled meanwhile (the engine stopped), it is still awaited to its end
        (a BLOCK is at most 500 ms) and what it took is handed back at once: a reply
        dropped in flight would leave its entries pending on this consumer, unsent,
        until another worker claimed them after claim_after (counting a delivery)."""
        task = asyncio.ensure_future(read)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            try:
                taken = entries_of(await task)
            except asyncio.CancelledError:
                task.cancel()  # cancelled again (a second signal): the read is dropped
                raise
            except Exception:  # noqa: BLE001 - Stopped, Redis gone: nothing known taken
                taken = []
            for entry in self._hold_fresh(taken):  # stopping: straight back
                self.hold.settle(b"R", entry)  # held (the engine stopped on its own): back all the same
            raise

    async def _empty(self) -> bool:
        hold = self.hold
        if hold.entries or not hold.settles.empty():
            return False
        return int(await hold.call(lambda: hold.redis.xlen(hold.keys.stream), "length")) == 0

    async def _deliveries(self, entries: list[Entry]) -> list[Delivery]:
        """Hold the entries, mark those whose id is done already (the ledger
        acknowledges them) and compose the rest in a thread. Entries held here and
        not handed to the engine (stopped, or Redis gone meanwhile) are handed back."""
        fresh = self._hold_fresh(entries)
        if not fresh:
            return []
        try:
            return await self._judge(fresh)
        except BaseException:  # Stopped, or the engine stopping (cancelled): never left held
            for entry in fresh:
                self.hold.settle(b"R", entry)
            raise

    def _hold_fresh(self, entries: list[Entry]) -> list[Entry]:
        """The entries not held yet (a claim may return ours), held now; none when
        stopping."""
        hold = self.hold
        fresh = [e for e in entries if e.entry_id not in hold.entries]
        for entry in fresh:
            hold.entries[entry.entry_id] = entry
        if fresh and hold.stopping.is_set():
            # A read in flight when the stop began (it may return what this worker has
            # just handed back): straight back again, not counted as released twice.
            for entry in fresh:
                entry.settling = True
                hold.settles.put_nowait(Settle(b"R", entry))
            return []
        return fresh

    async def _judge(self, fresh: list[Entry]) -> list[Delivery]:
        hold = self.hold
        done = await hold.call(lambda: hold.redis.hmget(hold.keys.done, [e.job_id for e in fresh]), "check")
        todo = [entry for entry, status in zip(fresh, done, strict=True) if status is None]
        prepared = iter(await asyncio.to_thread(_prepare, todo, self.composer) if todo else [])
        return [_delivery(entry, next(prepared)) if status is None else
                Delivery(entry.line, entry.job_id, _size(entry), done=True, token=entry)
                for entry, status in zip(fresh, done, strict=True)]

    # -- keeping what is held --

    async def heartbeat(self, name: WorkerName, finishing: asyncio.Event) -> None:
        """Keep the held entries fresh and the worker's name alive; now and then forget
        consumers long gone. Ends when ``finishing`` is set."""
        hold = self.hold
        touch = hold.redis.register_script(TOUCH)
        prune = hold.redis.register_script(PRUNE)
        touch_every = name.touch_every
        next_prune = time.monotonic()
        prune_idle = max(self._claim_ms * 2, 300_000)
        while not finishing.is_set():
            try:
                async with asyncio.timeout(touch_every):
                    await finishing.wait()
                return
            except TimeoutError:
                pass
            try:
                await self._touch(touch, finishing)
                # After the touch, and never waiting out maxmemory: renewing the name is a
                # write Redis refuses then, and the touch must not wait behind it.
                holder = await name.renew(finishing)
                if holder:  # it expired while this worker could not renew it, and another took it
                    hold.refused = f"another worker took the name {hold.consumer!r} ({holder})"
                    log.error("worker.name_taken", consumer=hold.consumer, holder=holder)
                    hold.stop()
                    return
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY
                    await retrying(lambda: prune(keys=[hold.keys.stream],
                                                 args=[hold.group, hold.consumer, prune_idle]),
                                   what="prune", stop=finishing)
            except Stopped:
                return
            except redis_errors.ResponseError as exc:
                hold.refuse(exc, "touch")
                return

    async def _touch(self, touch: Any, finishing: asyncio.Event) -> None:
        """Every held entry, those sent and waiting to be recorded included: while Redis
        refuses the record (maxmemory) they must stay ours, or another worker claims
        them after claim_after and sends them a second time."""
        hold = self.hold
        ids = list(hold.entries)
        if not ids:
            return
        args: list[Any] = [hold.group, hold.consumer, *ids]
        sent = time.monotonic()
        lost = set(await retrying(partial(touch, keys=[hold.keys.stream], args=args), what="touch",
                                  stop=finishing, on_back=hold.redis_back))
        for entry_id in ids:
            entry = hold.entries.get(entry_id)
            if entry is None or entry.settling:
                continue  # settled while the script ran (a commit races the touch): not lost
            if entry_id in lost:
                entry.lost = True  # never sent now: the pool asks entry.admitted()
            else:
                entry.lease_until = sent + hold.lease
        lost_held = [e for e in lost if e in hold.entries and not hold.entries[e].settling]
        if lost_held:
            log.warning("worker.entries_claimed_by_others", consumer=hold.consumer, entries=len(lost_held))


class WorkerName:
    """Two live workers with one name would take back each other's entries as their
    own: the name is a key this worker keeps alive, expiring soon after it dies."""

    def __init__(self, hold: Hold) -> None:
        self.hold = hold
        self.touch_every = min(max(hold.claim_after / 3, 0.05), 10.0)
        self._key = hold.keys.worker(hold.consumer)
        self._token = f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}"
        self._ttl_ms = round(max(3 * self.touch_every, 2.0) * 1000)
        self._script = hold.redis.register_script(NAME)
        self.held = False  # this worker holds its name: give it back when leaving

    async def take(self) -> str:
        """Take or keep this worker's name; '' when it is ours, else who holds it."""
        holder = await retrying(partial(self._script, keys=[self._key], args=[self._token, self._ttl_ms]),
                                what="name")
        found = _text(holder)
        self.held = not found
        return found

    async def renew(self, finishing: asyncio.Event) -> str:
        """``take`` for the heartbeat: at maxmemory, keep the name we have (its TTL is
        three heartbeats) and try again on the next one."""
        try:
            holder = await retrying(partial(self._script, keys=[self._key], args=[self._token, self._ttl_ms]),
                                    what="name", stop=finishing, wait_out_of_memory=False)
        except redis_errors.ResponseError as exc:
            if not out_of_memory(exc):
                raise
            log.warning("worker.name_not_renewed", consumer=self.hold.consumer, error=str(exc)[:200])
            return ""
        return _text(holder)

    async def give_back(self) -> None:
        if not self.held:
            return
        script = self.hold.redis.register_script(UNNAME)
        await _once(partial(script, keys=[self._key], args=[self._token]), "name")

    async def leave_group(self) -> None:
        """Leave the group's consumer list when nothing of ours is pending (one try)."""
        hold = self.hold
        script = hold.redis.register_script(FORGET)
        await _once(partial(script, keys=[hold.keys.stream], args=[hold.group, hold.consumer]), "leave the group")


async def _once(op: Callable[[], Awaitable[Any]], what: str) -> None:
    gone = asyncio.Event()
    gone.set()  # one try
    try:
        await retrying(op, what=what, stop=gone)
    except (Stopped, redis_errors.RedisError):
        pass


def _text(holder: Any) -> str:
    return holder.decode("utf-8", "replace") if isinstance(holder, bytes) else str(holder or "")


def _flat(fields: Any) -> list[Any]:
    if isinstance(fields, dict):
        return [part for pair in fields.items() for part in pair]
    return list(fields or [])


def _entry(entry_id: bytes, fields: list[Any], deliveries: int | None, lease_until: float) -> Entry:
    """``deliveries`` None: read (XREADGROUP), this entry's first delivery, after the
    ``tries`` of the entries it was handed back from."""
    values = dict(zip(fields[::2], fields[1::2], strict=True))
    raw_line = values.get(b"line", b"0")
    try:
        line = int(raw_line)
    except ValueError:
        line = 0
    job_id = values.get(b"id", b"").decode("utf-8", "replace")
    if deliveries is None:
        deliveries = 1 + int(values.get(b"tries", b"0") or 0)
    return Entry(entry_id, job_id, line, values.get(b"job"), deliveries, lease_until)


def _size(entry: Entry) -> int:
    return len(entry.job) if entry.job is not None else 0


def _delivery(entry: Entry, ready: Outgoing | JobError) -> Delivery:
    if isinstance(ready, JobError):
        return Delivery(entry.line, entry.job_id, _size(entry), error=ready, parsed=True, token=entry)
    return Delivery(entry.line, entry.job_id, _size(entry), outgoing=ready, lease=entry.admitted, token=entry)


def _prepare(entries: list[Entry], composer: Composer) -> list[Outgoing | JobError]:
    """Each entry's job through the compose stage ``run`` uses (parse, render, unsubscribe,
    attachments, build, DKIM), in a thread: it may read files and sign."""
    out: list[Outgoing | JobError] = []
    for entry in entries:
        if entry.job is None:
            out.append(JobError("", "the stream entry has no job"))
            continue
        outcome = composer.compose(Line(entry.line, entry.job, len(entry.job)))
        out.append(outcome.outgoing if isinstance(outcome, Ready) else outcome.error)
    return out
