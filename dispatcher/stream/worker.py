"""``dispatcher worker``: send the jobs of a Redis Stream through a pool, in a consumer group.

    XREADGROUP (batches) -> skip ids already done -> parse + build (a thread) -> pool.submit
        -> SETTLE (one script: result row + id done + XACK)

An entry is *held* from the moment this worker reads or claims it until its settle is
committed; the worker holds at most ``slots`` entries and keeps their idle time fresh
(TOUCH), so that no other worker claims what a live worker is still sending. Entries
of a dead worker go idle and are claimed (XAUTOCLAIM) after ``redis.claim_after``.

Each held entry carries a *lease*: half of ``claim_after`` from the moment the request
that last reset its idle time was sent. The pool asks the lease right before the job
goes on the wire (``admit``); a worker that was paused (SIGSTOP, a long GC) finds its
leases lapsed and asks Redis (CONFIRM) whether each entry is still its own and its id
not done before sending it, so it never sends what another worker claimed meanwhile.
Outcomes:

- sent, permanently failed, invalid: recorded and acknowledged (F);
- a transient failure (4xx outlasting ``retry.max_attempts``): deferred (D) — back to
  the end of the stream at once with its reason, this delivery counted; after
  ``max_deliveries`` such deliveries it goes to the dead stream with that reason;
- never sent (stopping, pool closed, relay refused): released (R) — back to the end of
  the stream at once, for any worker, without counting a delivery.
"""

from __future__ import annotations

import asyncio
import math
import os
import signal
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from dispatcher.compose.jobs import JobError, Line, Outgoing
from dispatcher.compose.stage import Composer, Ready
from dispatcher.compose.templates import SETTINGS_FIELDS
from dispatcher.config import Settings
from dispatcher.exit import ExitCode
from dispatcher.loop.suppression import Admission, StoreError, open_store
from dispatcher.loop.verp import envelope_id_for
from dispatcher.observe.metrics import MetricsError, MetricsServer
from dispatcher.observe.metrics import serve as serve_metrics
from dispatcher.relays import Sender
from dispatcher.sender import Sending, build_sender
from dispatcher.signals import signal_handlers
from dispatcher.sink import DEFAULT_MAILDIR
from dispatcher.stream.keys import Keys
from dispatcher.stream.ratelimit import RedisRateLimiter
from dispatcher.stream.scripts import CONFIRM, FORGET, NAME, PRUNE, SETTLE, TAKE, TOUCH, UNNAME
from dispatcher.stream.store import Stopped, describe, encoded_row, ensure_group, out_of_memory, redact, retrying
from pool import DeliveryError, PoolClosedError, PoolError, RelayError, Withdrawn

log = structlog.get_logger("dispatcher.worker")

MAX_BATCH = 256  # entries per read or claim, and settles per script call
COMMITS = 4  # settle scripts in flight at once
PRUNE_EVERY = 60.0


def default_claim_after(settings: Settings) -> float:
    """Long enough that a live worker always finishes first: every attempt timing out
    (on the slowest relay), plus the longest backoff, plus a margin."""
    timeouts = [relay.timeout for relay in settings.relays or ()]
    timeout = max(timeouts) if timeouts else settings.smtp.timeout if settings.smtp is not None else 30.0
    return timeout * settings.retry.max_attempts + settings.retry.backoff_max + 30.0


def default_slots(settings: Settings) -> int:
    """Entries a worker holds at once: enough that the pool never waits while settles
    are committed (one Redis round trip with its fsync), 16 per connection; with a rate
    limit, no more than about one second's worth, so that other workers get their share."""
    slots = max(256, 16 * settings.pool.size)
    if settings.pool.rate_limit:
        slots = min(slots, max(2 * settings.pool.size, math.ceil(settings.pool.rate_limit)))
    return slots


def default_consumer() -> str:
    return f"{socket.gethostname() or 'worker'}-{os.getpid()}"


@dataclass
class WorkerOptions:
    url: str
    consumer: str
    group: str
    claim_after: float  # seconds
    max_deliveries: int
    attachments_root: Path
    maildir: Path = DEFAULT_MAILDIR
    until_empty: bool = False  # exit 0 once the stream holds nothing, pending included
    slots: int | None = None  # entries held at once; None: default_slots(settings)


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
class _Settle:
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
class _Ticks:
    next_claim: float = 0.0
    claim_start: str = "0-0"
    started: float = field(default_factory=time.monotonic)


class _CannotStart(Exception):
    """The worker cannot start (exit 2): one line for the user."""


class Worker:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings, options: WorkerOptions) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.options = options
        self.consumer = options.consumer
        self.counts = WorkerCounts()
        self.held: dict[bytes, Entry] = {}
        self.slots = options.slots or default_slots(settings)
        self._read_at = max(1, self.slots // 4)
        self.stopping = asyncio.Event()  # stop reading: a signal, a relay failure, or empty
        self.signalled = False
        self.fatal: RelayError | None = None
        self.broken: str | None = None  # the pool failed (a bug): why
        self.refused: str | None = None  # Redis refused a command for good (one line): why
        self.pool: Sender | None = None
        self.registry = CollectorRegistry()
        WorkerMetrics(self, self.registry)
        self.composer: Composer | None = None  # made by execute (it reads the DKIM key)
        self.limiter: RedisRateLimiter | None = None
        # The suppression list, in memory, reloaded when changed (SQLite here, or a Redis hash shared by all).
        self.admission = Admission(open_store(settings.suppression, options.url), auto=settings.suppression.auto,
                                   source="worker", refresh=settings.suppression.refresh, registry=self.registry)
        self._room = asyncio.Event()  # a slot was freed (or we are stopping)
        self._finishing = asyncio.Event()  # every handler is done: heartbeat may end
        self._settles: asyncio.Queue[_Settle | None] = asyncio.Queue()
        self._aborted = False
        self._work: asyncio.Task[None] | None = None
        self._ticks = _Ticks()
        claim_ms = max(1, round(options.claim_after * 1000))
        self._claim_ms = claim_ms
        self._lease = options.claim_after / 2
        self._claim_every = min(max(options.claim_after / 2, 0.05), 10.0)
        self._touch_every = min(max(options.claim_after / 3, 0.05), 10.0)
        self._take = redis.register_script(TAKE)
        self._settle_script = redis.register_script(SETTLE)
        self._touch = redis.register_script(TOUCH)
        self._prune = redis.register_script(PRUNE)
        self._confirm_script = redis.register_script(CONFIRM)
        self._name_script = redis.register_script(NAME)
        # Two live workers with one name would take back each other's entries as their
        # own: the name is a key this worker keeps alive, expiring soon after it dies.
        self._name_key = keys.worker(self.consumer)
        self._name_token = f"host {socket.gethostname()} pid {os.getpid()} since {time.strftime('%H:%M:%S')}"
        self._name_ttl_ms = round(max(3 * self._touch_every, 2.0) * 1000)
        self._named = False  # this worker holds its name: give it back when leaving

    # -- the run --

    async def execute(self) -> int:
        """Work until stopped (or, with ``until_empty``, until the stream is empty).
        Returns the exit status. Redis must have answered a PING already."""
        metrics_server: MetricsServer | None = None
        sending: Sending | None = None
        try:
            await self._start()
            if self.settings.metrics.port is not None:
                metrics_server = self._serve_metrics()
            sending = await self._build_sender()
            log.info("worker.start", consumer=self.consumer, stream=self.keys.stream, group=self.options.group,
                     redis=redact(self.options.url), **sending.where, slots=self.slots,
                     claim_after=self.options.claim_after, max_deliveries=self.options.max_deliveries,
                     rate_limit=self.settings.pool.rate_limit,
                     metrics=metrics_server.url if metrics_server is not None else None)
            await self._work_until_stopped()
        except _CannotStart as exc:
            print(f"dispatcher worker: {exc}", file=sys.stderr)
            return ExitCode.USAGE
        finally:
            await self._close(sending, metrics_server)
        log.info("worker.summary", consumer=self.consumer, **self.counts.as_dict(),
                 elapsed_s=round(time.monotonic() - self._ticks.started, 3), stopped_by_signal=self.signalled)
        return self._exit_code()

    async def _start(self) -> None:
        """The group, the compose stage of `run` (templates, unsubscribe headers, DKIM,
        attachments under the root) and this worker's name. Raises _CannotStart."""
        try:
            await retrying(lambda: ensure_group(self.redis, self.keys, self.options.group), what="create group")
        except redis_errors.RedisError as exc:
            raise _CannotStart(describe(exc, self.keys, self.options.group)) from None
        root = self.options.attachments_root
        try:
            self.composer = Composer(self.settings, base_dir=root, attachments_root=root, batch=self.keys.stream)
        except ValueError as exc:
            raise _CannotStart(str(exc)) from None
        try:
            await asyncio.to_thread(self.admission.load)
        except StoreError as exc:
            raise _CannotStart(str(exc)) from None
        try:
            holder = await self._keep_name()
        except redis_errors.RedisError as exc:
            raise _CannotStart(describe(exc, self.keys, self.options.group)) from None
        if holder:
            raise _CannotStart(f"a worker named {self.consumer!r} is running already ({holder}); give each worker "
                               f"its own --name")
        self._named = True

    def _serve_metrics(self) -> MetricsServer:
        try:
            return serve_metrics(self.settings.metrics.address, self.settings.metrics.port or 0, self.registry)
        except MetricsError as exc:
            raise _CannotStart(str(exc)) from None

    async def _build_sender(self) -> Sending:
        # The rate limit is held in Redis, across workers, not by each pool: the pool
        # takes a slot of the shared bucket as each message goes on the wire.
        if self.settings.pool.rate_limit:
            self.limiter = RedisRateLimiter(self.redis, self.keys.rate, self.settings.pool.rate_limit)
        try:
            sending = await build_sender(self.settings, self.registry, maildir=self.options.maildir,
                                         command="dispatcher worker", rate_limiter=self.limiter)
        except (ValueError, OSError) as exc:  # a CA file that cannot be read, a capture server's port
            raise _CannotStart(str(exc)) from None
        self.pool = sending.sender
        return sending

    async def _work_until_stopped(self) -> None:
        with self._signals():
            self._work = asyncio.create_task(self._run())
            try:
                await self._work
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._aborted or (task is not None and task.cancelling()):
                    raise
            else:
                await self._forget()

    async def _close(self, sending: Sending | None, metrics_server: MetricsServer | None) -> None:
        if self.pool is not None:
            if self._aborted:
                self.pool.terminate()
            await self.pool.close(drain=False)
        if sending is not None:
            await sending.close()
        if metrics_server is not None:
            metrics_server.stop()
        if self._named:
            await self._give_name_back()

    def _exit_code(self) -> ExitCode:
        if self.signalled:
            return ExitCode.SIGNAL
        if self.fatal is not None:
            print(f"dispatcher worker: relay {self.fatal.relay}: {self.fatal}", file=sys.stderr)
            return ExitCode.RELAY_DOWN if self.fatal.transient else ExitCode.USAGE
        if self.refused is not None:
            print(f"dispatcher worker: {self.refused}; stopped", file=sys.stderr)
            return ExitCode.USAGE
        if self.broken is not None:
            print(f"dispatcher worker: stopped: {self.broken} (its jobs were handed back)", file=sys.stderr)
            return ExitCode.USAGE
        return ExitCode.OK

    async def _run(self) -> None:
        assert self.pool is not None
        async with asyncio.TaskGroup() as group:
            group.create_task(self._finisher())
            group.create_task(self._heartbeat())
            group.create_task(self._close_when_stopping())
            watch = group.create_task(self.admission.watch())
            try:
                async with asyncio.TaskGroup() as handlers:
                    await self._read(handlers)
            finally:
                self._finishing.set()
                self._settles.put_nowait(None)
                watch.cancel()

    async def _close_when_stopping(self) -> None:
        """Once stopping (a signal, a relay failure, or empty), finish what is on the wire
        at once: what is only queued in the pool fails with PoolClosedError and is released."""
        assert self.pool is not None
        await self.stopping.wait()
        await self.pool.close(drain=False)

    # -- reading --

    async def _read(self, handlers: asyncio.TaskGroup) -> None:
        try:
            start = "-"
            while start and not self.stopping.is_set():  # a restarted worker's own entries first
                if not await self._wait_room():
                    return
                start, entries = await self._take_entries("own", start)
                await self._dispatch(entries, handlers)
            while not self.stopping.is_set():
                if not await self._wait_room():
                    return
                now = time.monotonic()
                if now >= self._ticks.next_claim:
                    cursor, entries = await self._take_entries("idle", self._ticks.claim_start)
                    self._ticks.claim_start = cursor or "0-0"
                    if not cursor:
                        self._ticks.next_claim = now + self._claim_every
                    if entries:
                        await self._dispatch(entries, handlers)
                        continue
                block = max(1, min(500, round((self._ticks.next_claim - time.monotonic()) * 1000)))
                entries = await self._read_new(block)
                if entries:
                    await self._dispatch(entries, handlers)
                elif self.options.until_empty and await self._empty():
                    log.info("worker.empty", consumer=self.consumer)
                    self.stopping.set()
        except Stopped:
            return

    async def _wait_room(self) -> bool:
        """Wait until a quarter of the slots are free (a read fetches a batch worth its
        round trip, while the pool still has three quarters to send); False when
        stopping instead."""
        while self.slots - len(self.held) < self._read_at and not self.stopping.is_set():
            self._room.clear()
            await self._room.wait()
        return not self.stopping.is_set()

    def _room_left(self) -> int:
        return max(1, min(MAX_BATCH, self.slots - len(self.held)))

    async def _take_entries(self, mode: str, start: str) -> tuple[str, list[Entry]]:
        keys = [self.keys.stream, self.keys.dead, self.keys.errors, self.keys.stats]
        args: list[Any] = [self.options.group, self.consumer, mode, self._claim_ms, self._room_left(),
                self.options.max_deliveries, start]
        sent = time.monotonic()
        cursor, raw = await self._redis(lambda: self._take(keys=keys, args=args), f"claim ({mode})")
        entries = [_entry(entry_id, fields, int(n), sent + self._lease) for entry_id, fields, n in raw]
        if entries:
            log.info("worker.claimed" if mode == "idle" else "worker.took_back", consumer=self.consumer,
                     entries=len(entries))
        return cursor.decode() if isinstance(cursor, bytes) else str(cursor), entries

    async def _read_new(self, block_ms: int) -> list[Entry]:
        sent = time.monotonic()
        reply = await self._redis(
            lambda: self.redis.xreadgroup(self.options.group, self.consumer, {self.keys.stream: ">"},
                                          count=self._room_left(), block=block_ms),
            "read")
        entries: list[Entry] = []
        for _stream, items in reply or []:
            for entry_id, fields in items:
                entries.append(_entry(entry_id, _flat(fields), None, sent + self._lease))
        return entries

    async def _empty(self) -> bool:
        if self.held or not self._settles.empty():
            return False
        return int(await self._redis(lambda: self.redis.xlen(self.keys.stream), "length")) == 0

    async def _redis(self, op: Any, what: str) -> Any:
        """``op`` through ``retrying``; Stopped when stopping while Redis is away, or when
        Redis refuses it for good (then the worker stops, exit 2)."""
        try:
            return await retrying(op, what=what, stop=self.stopping, on_back=self._redis_back)
        except redis_errors.ResponseError as exc:
            self._refuse(exc, what)
            raise Stopped from None

    def _refuse(self, exc: redis_errors.RedisError, what: str) -> None:
        """Redis refused a command for good (a deleted stream or group, a key of another
        type, a permission): stop. What is held is handed back (if Redis lets us)."""
        if self.refused is None:
            self.refused = describe(exc, self.keys, self.options.group)
            log.error("worker.redis_refused", doing=what, error=self.refused)
        self._stop()

    def _redis_back(self) -> None:
        """Redis was away (restarting?): every worker's touches failed meanwhile, so the
        entries of live workers look idle. Claim nothing until each has had claim_after
        to touch its entries again; a worker that died meanwhile is claimed after that."""
        self._ticks.next_claim = max(self._ticks.next_claim, time.monotonic() + self.options.claim_after)

    async def _dispatch(self, entries: list[Entry], handlers: asyncio.TaskGroup) -> None:
        """Hold the entries, acknowledge those already done, build the rest in a thread
        and hand each to a handler task."""
        fresh = [e for e in entries if e.entry_id not in self.held]  # a claim may return ours
        if not fresh:
            return
        for entry in fresh:
            self.held[entry.entry_id] = entry
        if self.stopping.is_set():
            # A read in flight when the stop began (it may return what this worker has
            # just handed back): straight back again, not counted as released twice.
            for entry in fresh:
                entry.settling = True
                self._settles.put_nowait(_Settle(b"R", entry))
            return
        try:
            done = await self._redis(lambda: self.redis.hmget(self.keys.done, [e.job_id for e in fresh]), "check")
        except Stopped:
            for entry in fresh:
                self._settle(b"R", entry)
            raise
        todo = []
        for entry, status in zip(fresh, done, strict=True):
            if status is not None:
                self.counts.skipped += 1
                self._settle(b"F", entry)  # status '': acknowledge only
            else:
                todo.append(entry)
        if not todo:
            return
        assert self.composer is not None
        prepared = await asyncio.to_thread(_prepare, todo, self.composer)
        for entry, ready in zip(todo, prepared, strict=True):
            handlers.create_task(self._handle(entry, ready))

    # -- sending --

    async def _handle(self, entry: Entry, ready: Outgoing | JobError) -> None:
        assert self.pool is not None
        if isinstance(ready, JobError):
            if ready.field in SETTINGS_FIELDS:  # this worker's configuration: hand the job back, stop
                self._give_up(entry, str(ready))
                return
            self._finished(entry, "invalid", error=f"line {entry.line}: {ready}")
            return
        if self.stopping.is_set():
            self._settle(b"R", entry)
            return
        recipients, suppressed = self.admission.admit(ready.recipients)
        if not recipients:
            self._finished(entry, "suppressed", suppressed=suppressed)
            return
        started = time.monotonic()
        try:
            while True:
                try:
                    result = await self.pool.submit(ready.message, sender=ready.sender, recipients=recipients,
                                                    prepared=ready.prepared, admit=entry.admitted,
                                                    envelope_id=envelope_id_for(entry.job_id))
                    break
                except Withdrawn:
                    if not await self._confirm(entry):
                        return
        except DeliveryError as exc:
            await self.admission.refused(entry.job_id, exc.refused)
            if exc.permanent:
                self._finished(entry, "failed", attempts=exc.attempts, code=exc.code, response=exc.response,
                               refused=exc.refused, error=str(exc), elapsed_ms=_ms(started),
                               message_id=exc.message_id, suppressed=suppressed)
            else:
                self.counts.deferred += 1
                log.info("job.deferred", id=entry.job_id, deliveries=entry.deliveries, error=str(exc))
                self._settle(b"D", entry, payload=f"{exc}".encode("utf-8", "replace"))
        except RelayError as exc:
            self._settle(b"R", entry)
            if self.fatal is None:
                self.fatal = exc
                log.error("worker.relay_error", relay=exc.relay, transient=exc.transient, error=str(exc))
                self._stop()
        except PoolClosedError:
            self._settle(b"R", entry)  # never on the wire: the next claim sends it
        except PoolError as exc:  # the pool stopped on an internal error: hand the job back, stop
            if self.broken is None:
                log.error("worker.pool_failed", error=str(exc))
            self._give_up(entry, str(exc))
        except ValueError as exc:
            self._finished(entry, "invalid", error=f"line {entry.line}: {exc}")
        else:
            self._finished(entry, "sent", attempts=result.attempts, code=result.code, response=result.response,
                           refused=result.refused, elapsed_ms=round(result.elapsed * 1000, 1),
                           message_id=result.message_id, suppressed=suppressed)
            await self.admission.refused(entry.job_id, result.refused, delivered=True)

    async def _confirm(self, entry: Entry) -> bool:
        """The entry's lease lapsed before it went on the wire: True when it is still
        ours and its id not done (its lease starts again); otherwise it is settled or
        dropped here and False is returned."""
        if entry.lost:
            self._drop(entry)
            return False
        sent = time.monotonic()
        keys = [self.keys.stream, self.keys.done]
        args: list[Any] = [self.options.group, self.consumer, entry.entry_id, entry.job_id]
        try:
            verdict = int(await self._redis(lambda: self._confirm_script(keys=keys, args=args), "confirm"))
        except Stopped:
            self._settle(b"R", entry)
            return False
        if verdict == 1:
            entry.lease_until = sent + self._lease
            return True
        if verdict == 2:
            self.counts.skipped += 1
            self._settle(b"F", entry)  # done meanwhile, still ours: acknowledge only
        else:
            self._drop(entry)
        return False

    def _drop(self, entry: Entry) -> None:
        """Another worker claimed the entry while this one was paused: leave it to them."""
        self.counts.lost += 1
        log.warning("job.claimed_by_another", id=entry.job_id, consumer=self.consumer)
        self.held.pop(entry.entry_id, None)
        self._room.set()

    def _give_up(self, entry: Entry, why: str) -> None:
        """This worker cannot send (its configuration, or its pool failed): the job goes
        back to the stream for another worker, and this one stops (exit 2)."""
        self._settle(b"R", entry)
        if self.broken is None:
            self.broken = why
            self._stop()

    def _finished(self, entry: Entry, status: str, **fields: Any) -> None:
        setattr(self.counts, status, getattr(self.counts, status) + 1)
        if status == "invalid":
            log.warning("job.invalid", id=entry.job_id, line=entry.line, error=fields.get("error"))
        self._settle(b"F", entry, status.encode(), encoded_row(entry.job_id, entry.line, status, **fields))

    def _settle(self, kind: bytes, entry: Entry, status: bytes = b"", payload: bytes = b"") -> None:
        if kind == b"R":
            self.counts.released += 1
        entry.settling = True
        self._settles.put_nowait(_Settle(kind, entry, status, payload))

    # -- recording --

    async def _finisher(self) -> None:
        """Commit settles in batches, one script call each, retrying while Redis is away
        (the script is idempotent). Up to COMMITS batches are in flight at once, so that a
        message accepted by the relay waits one Redis round trip (fsync included) to be
        recorded, not two: what a killed worker had accepted but not recorded is sent
        again. A slot is free only once its settle is committed."""
        room = asyncio.Semaphore(COMMITS)
        async with asyncio.TaskGroup() as commits:
            last = False
            while not last:
                item = await self._settles.get()
                if item is None:
                    return
                # Batch what comes while a commit slot frees, and what the same turn of
                # the loop settles (one read of replies resolves several messages).
                await room.acquire()
                await asyncio.sleep(0)
                batch = [item]
                while len(batch) < MAX_BATCH and not self._settles.empty():
                    following = self._settles.get_nowait()
                    if following is None:
                        last = True
                        break
                    batch.append(following)
                commits.create_task(self._commit(batch, room))

    async def _commit(self, batch: list[_Settle], room: asyncio.Semaphore) -> None:
        keys = [self.keys.stream, self.keys.results, self.keys.done, self.keys.stats, self.keys.errors,
                self.keys.finished, self.keys.dead, self.keys.invalid]
        args: list[Any] = [self.options.group, self.consumer, self.options.max_deliveries]
        for s in batch:
            args += [s.kind, s.entry.entry_id, s.entry.job_id, s.status, s.payload]
        try:
            await retrying(partial(self._settle_script, keys=keys, args=args), what="record results",
                           on_back=self._redis_back)
        except redis_errors.ResponseError as exc:
            self._refuse(exc, "record results")  # not recorded: these jobs may be sent again
        finally:
            room.release()
        for s in batch:
            self.held.pop(s.entry.entry_id, None)
        self._room.set()

    async def _heartbeat(self) -> None:
        """Keep the held entries fresh; now and then forget consumers long gone."""
        next_prune = time.monotonic()
        prune_idle = max(self._claim_ms * 2, 300_000)
        while not self._finishing.is_set():
            try:
                async with asyncio.timeout(self._touch_every):
                    await self._finishing.wait()
                return
            except TimeoutError:
                pass
            # Every held entry, those sent and waiting to be recorded included: while
            # Redis refuses the record (maxmemory) they must stay ours, or another worker
            # claims them after claim_after and sends them a second time.
            ids = list(self.held)
            try:
                if ids:
                    args: list[Any] = [self.options.group, self.consumer, *ids]
                    sent = time.monotonic()
                    lost = set(await retrying(partial(self._touch, keys=[self.keys.stream], args=args),
                                              what="touch", stop=self._finishing, on_back=self._redis_back))
                    for entry_id in ids:
                        entry = self.held.get(entry_id)
                        if entry is None or entry.settling:
                            continue  # settled while the script ran (a commit races the touch): not lost
                        if entry_id in lost:
                            entry.lost = True  # never sent now: the pool asks entry.admitted()
                        else:
                            entry.lease_until = sent + self._lease
                    lost_held = [e for e in lost if e in self.held and not self.held[e].settling]
                    if lost_held:
                        log.warning("worker.entries_claimed_by_others", consumer=self.consumer,
                                    entries=len(lost_held))
                # After the touch, and never waiting out maxmemory: renewing the name is a
                # write Redis refuses then, and the touch must not wait behind it.
                holder = await self._renew_name()
                if holder:  # it expired while this worker could not renew it, and another took it
                    self.refused = f"another worker took the name {self.consumer!r} ({holder})"
                    log.error("worker.name_taken", consumer=self.consumer, holder=holder)
                    self._stop()
                    return
                if time.monotonic() >= next_prune:
                    next_prune = time.monotonic() + PRUNE_EVERY
                    await retrying(lambda: self._prune(keys=[self.keys.stream],
                                                       args=[self.options.group, self.consumer, prune_idle]),
                                   what="prune", stop=self._finishing)
            except Stopped:
                return
            except redis_errors.ResponseError as exc:
                self._refuse(exc, "touch")
                return

    async def _renew_name(self) -> str:
        """``_keep_name`` for the heartbeat: at maxmemory, keep the name we have (its
        TTL is three heartbeats) and try again on the next one."""
        try:
            holder = await retrying(partial(self._name_script, keys=[self._name_key],
                                            args=[self._name_token, self._name_ttl_ms]),
                                    what="name", stop=self._finishing, wait_out_of_memory=False)
        except redis_errors.ResponseError as exc:
            if not out_of_memory(exc):
                raise
            log.warning("worker.name_not_renewed", consumer=self.consumer, error=str(exc)[:200])
            return ""
        return holder.decode("utf-8", "replace") if isinstance(holder, bytes) else str(holder or "")

    async def _keep_name(self, stop: asyncio.Event | None = None) -> str:
        """Take or keep this worker's name; '' when it is ours, else who holds it."""
        holder = await retrying(partial(self._name_script, keys=[self._name_key],
                                        args=[self._name_token, self._name_ttl_ms]), what="name", stop=stop)
        return holder.decode("utf-8", "replace") if isinstance(holder, bytes) else str(holder or "")

    async def _give_name_back(self) -> None:
        script = self.redis.register_script(UNNAME)
        gone = asyncio.Event()
        gone.set()  # one try
        try:
            await retrying(partial(script, keys=[self._name_key], args=[self._name_token]), what="name",
                           stop=gone)
        except (Stopped, redis_errors.RedisError):
            pass

    async def _forget(self) -> None:
        """Leave the group's consumer list when nothing of ours is pending (one try)."""
        script = self.redis.register_script(FORGET)
        gone = asyncio.Event()
        gone.set()
        try:
            await retrying(partial(script, keys=[self.keys.stream], args=[self.options.group, self.consumer]),
                           what="leave the group", stop=gone)
        except (Stopped, redis_errors.ResponseError):
            pass

    # -- signals --

    def _stop(self) -> None:
        self.stopping.set()
        self._room.set()

    @contextmanager
    def _signals(self) -> Iterator[None]:
        def stop(signum: int) -> None:
            if self.signalled:
                # A second signal: drop the sessions now; what was held stays pending.
                self._aborted = True
                if self._work is not None:
                    self._work.cancel()
                return
            self.signalled = True
            self._stop()
            log.warning("worker.stopping", signal=signal.Signals(signum).name)
            print("dispatcher worker: stopping: finishing the messages on the wire "
                  "(a second signal stops at once)", file=sys.stderr, flush=True)

        with signal_handlers(stop):
            yield


class WorkerMetrics(Collector):
    """``dispatcher_jobs_total{status}`` of this worker (as ``run`` counts them; ``skipped``:
    found done when read) and ``dispatcher_worker_entries_held``, read when scraped."""

    STATUSES = ("sent", "failed", "invalid", "skipped")

    def __init__(self, worker: Worker, registry: CollectorRegistry) -> None:
        self._worker = worker
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("dispatcher_jobs", "Jobs of this worker by outcome.", labels=["status"])
        yield GaugeMetricFamily("dispatcher_worker_entries_held", "Stream entries this worker holds now.")

    def collect(self) -> Iterator[Metric]:
        counts = self._worker.counts
        jobs = CounterMetricFamily("dispatcher_jobs", "Jobs of this worker by outcome.", labels=["status"])
        for status in self.STATUSES:
            jobs.add_metric([status], getattr(counts, status))
        yield jobs
        yield GaugeMetricFamily("dispatcher_worker_entries_held", "Stream entries this worker holds now.",
                                value=len(self._worker.held))


# -- helpers --


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


def _prepare(entries: list[Entry], composer: Composer) -> list[Outgoing | JobError]:
    """Each entry's job through the compose stage ``run`` uses (parse, render, unsubscribe,
    attachments, build, DKIM), in a thread: it may read files and sign. Jobs come from
    the network: the composer reads a path only under the worker's attachments root."""
    out: list[Outgoing | JobError] = []
    for entry in entries:
        if entry.job is None:
            out.append(JobError("", "the stream entry has no job"))
            continue
        outcome = composer.compose(Line(entry.line, entry.job, len(entry.job)))
        out.append(outcome.outgoing if isinstance(outcome, Ready) else outcome.error)
    return out


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)

