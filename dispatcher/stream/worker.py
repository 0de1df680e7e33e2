"""``dispatcher worker``: the jobs of a Redis Stream sent by the engine
(``dispatcher.engine``), in a consumer group.

    XREADGROUP (batches) -> skip ids already done -> parse + build (a thread) -> pool.submit
        -> SETTLE (one script: result row + id done + XACK)

The stream is the engine's source (``dispatcher.stream.source``: read, claim, hold,
lease, heartbeat) and its ledger (``dispatcher.stream.ledger``: confirm, settle). This
module starts them (group, compose stage, suppression list, name, sender, metrics),
handles signals and says how the worker ended.
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
from dataclasses import dataclass
from pathlib import Path

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from dispatcher.compose.stage import Composer
from dispatcher.config import Settings
from dispatcher.engine.engine import Engine
from dispatcher.engine.tally import Tally
from dispatcher.exit import ExitCode
from dispatcher.loop.suppression import Admission, StoreError, open_store
from dispatcher.observe.metrics import MetricsError, MetricsServer
from dispatcher.observe.metrics import serve as serve_metrics
from dispatcher.relays import Sender
from dispatcher.sender import Sending, build_sender
from dispatcher.signals import signal_handlers
from dispatcher.sink import DEFAULT_MAILDIR
from dispatcher.stream.keys import Keys
from dispatcher.stream.ledger import StreamLedger
from dispatcher.stream.ratelimit import RedisRateLimiter
from dispatcher.stream.source import Hold, StreamSource, WorkerCounts, WorkerName
from dispatcher.stream.store import describe, ensure_group, redact, retrying

__all__ = ["Worker", "WorkerCounts", "WorkerOptions", "default_claim_after", "default_consumer", "default_slots"]

log = structlog.get_logger("dispatcher.worker")


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


class _CannotStart(Exception):
    """The worker cannot start (exit 2): one line for the user."""


class Worker:
    def __init__(self, redis: Redis, keys: Keys, settings: Settings, options: WorkerOptions) -> None:
        self.redis = redis
        self.keys = keys
        self.settings = settings
        self.options = options
        self.consumer = options.consumer
        self.slots = options.slots or default_slots(settings)
        self.hold = Hold(redis, keys, options.group, self.consumer, options.claim_after, self.slots)
        self.counts = self.hold.counts
        self.name = WorkerName(self.hold)
        self.signalled = False
        self.pool: Sender | None = None
        self.registry = CollectorRegistry()
        WorkerMetrics(self.hold, self.registry)
        self.limiter: RedisRateLimiter | None = None
        # The suppression list, in memory, reloaded when changed (SQLite here, or a Redis hash shared by all).
        self.admission = Admission(open_store(settings.suppression, options.url), auto=settings.suppression.auto,
                                   source="worker", refresh=settings.suppression.refresh, registry=self.registry)
        self.engine: Engine | None = None
        self._said: list[str] = []  # why the engine stopped, said once the worker is done
        self._aborted = False
        self._work: asyncio.Task[None] | None = None
        self._started = time.monotonic()

    async def execute(self) -> int:
        """Work until stopped (or, with ``until_empty``, until the stream is empty).
        Returns the exit status. Redis must have answered a PING already."""
        metrics_server: MetricsServer | None = None
        sending: Sending | None = None
        try:
            composer = await self._start()
            if self.settings.metrics.port is not None:
                metrics_server = self._serve_metrics()
            sending = await self._build_sender()
            log.info("worker.start", consumer=self.consumer, stream=self.keys.stream, group=self.options.group,
                     redis=redact(self.options.url), **sending.where, slots=self.slots,
                     claim_after=self.options.claim_after, max_deliveries=self.options.max_deliveries,
                     rate_limit=self.settings.pool.rate_limit,
                     metrics=metrics_server.url if metrics_server is not None else None)
            await self._work_until_stopped(composer, sending.sender)
        except _CannotStart as exc:
            print(f"dispatcher worker: {exc}", file=sys.stderr)
            return ExitCode.USAGE
        finally:
            await self._close(sending, metrics_server)
        log.info("worker.summary", consumer=self.consumer, **self.counts.as_dict(),
                 elapsed_s=round(time.monotonic() - self._started, 3), stopped_by_signal=self.signalled)
        return self._exit_code()

    async def _start(self) -> Composer:
        """The group, the compose stage of `run` (templates, unsubscribe headers, DKIM,
        attachments under the root) and this worker's name. Raises _CannotStart."""
        try:
            await retrying(lambda: ensure_group(self.redis, self.keys, self.options.group), what="create group")
        except redis_errors.RedisError as exc:
            raise _CannotStart(describe(exc, self.keys, self.options.group)) from None
        root = self.options.attachments_root
        try:
            composer = Composer(self.settings, base_dir=root, attachments_root=root, batch=self.keys.stream)
        except ValueError as exc:
            raise _CannotStart(str(exc)) from None
        try:
            await asyncio.to_thread(self.admission.load)
        except StoreError as exc:
            raise _CannotStart(str(exc)) from None
        try:
            holder = await self.name.take()
        except redis_errors.RedisError as exc:
            raise _CannotStart(describe(exc, self.keys, self.options.group)) from None
        if holder:
            raise _CannotStart(f"a worker named {self.consumer!r} is running already ({holder}); give each worker "
                               f"its own --name")
        return composer

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

    async def _work_until_stopped(self, composer: Composer, pool: Sender) -> None:
        source = StreamSource(self.hold, composer, max_deliveries=self.options.max_deliveries,
                              until_empty=self.options.until_empty)
        ledger = StreamLedger(self.hold, max_deliveries=self.options.max_deliveries)
        # The stream's side of the engine: its stop is the hold's (Redis refusing, the
        # name taken, a signal); a job showing the configuration wrong is handed back.
        self.engine = Engine(source, ledger, composer, pool, admission=self.admission, tally=Tally(),
                             say=self._say, limit=self.slots, max_bytes=self.settings.pool.max_bytes_in_flight,
                             stop=self.hold.stopping, connect_first=False,
                             config_stop=lambda error, line: f"stopped: {error} (its jobs were handed back)")
        with signal_handlers(self._on_signal):
            self._work = asyncio.create_task(self._run(source, ledger, self.engine))
            try:
                await self._work
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not self._aborted or (task is not None and task.cancelling()):
                    raise
            else:
                await self.name.leave_group()

    async def _run(self, source: StreamSource, ledger: StreamLedger, engine: Engine) -> None:
        """The engine, with the ledger's commits beside it until every settle is
        queued, and the source's heartbeat until every settle is committed."""
        finishing = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            finisher = group.create_task(ledger.finisher())
            # Held entries stay touched until their settles are committed, not only until
            # the engine stops: stopped while Redis refuses the records (maxmemory) for
            # longer than claim_after, this worker must still own what it sent, or another
            # worker claims it and sends it a second time.
            finisher.add_done_callback(lambda _: finishing.set())
            group.create_task(source.heartbeat(self.name, finishing))
            try:
                await engine.run()
            finally:
                self.hold.settles.put_nowait(None)

    async def _close(self, sending: Sending | None, metrics_server: MetricsServer | None) -> None:
        if self.pool is not None:
            if self._aborted:
                self.pool.terminate()
            await self.pool.close(drain=False)
        if sending is not None:
            await sending.close()
        if metrics_server is not None:
            metrics_server.stop()
        await self.name.give_back()

    def _say(self, message: str) -> None:
        if message not in self._said:
            self._said.append(message)

    def _exit_code(self) -> int:
        if self.signalled:
            return ExitCode.SIGNAL
        code = self.engine.stop_code if self.engine is not None else None
        fatal = self.engine.relay_error if self.engine is not None else None
        if fatal is not None and code is not None:
            log.error("worker.relay_error", relay=fatal.relay, transient=fatal.transient, error=str(fatal))
            print(f"dispatcher worker: relay {fatal.relay}: {fatal}", file=sys.stderr)
            return code
        if code is not None:
            for message in self._said:
                print(f"dispatcher worker: {message}", file=sys.stderr)
            return code
        if self.hold.refused is not None:
            print(f"dispatcher worker: {self.hold.refused}; stopped", file=sys.stderr)
            return ExitCode.USAGE
        return ExitCode.OK

    def _on_signal(self, signum: int) -> None:
        if self.signalled:
            # A second signal: drop the sessions now; what was held stays pending.
            self._aborted = True
            if self._work is not None:
                self._work.cancel()
            return
        self.signalled = True
        self.hold.stop()
        log.warning("worker.stopping", signal=signal.Signals(signum).name)
        print("dispatcher worker: stopping: finishing the messages on the wire "
              "(a second signal stops at once)", file=sys.stderr, flush=True)


class WorkerMetrics(Collector):
    """``dispatcher_jobs_total{status}`` of this worker (as ``run`` counts them; ``skipped``:
    found done when read) and ``dispatcher_worker_entries_held``, read when scraped."""

    STATUSES = ("sent", "failed", "invalid", "skipped")

    def __init__(self, hold: Hold, registry: CollectorRegistry) -> None:
        self._hold = hold
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        yield CounterMetricFamily("dispatcher_jobs", "Jobs of this worker by outcome.", labels=["status"])
        yield GaugeMetricFamily("dispatcher_worker_entries_held", "Stream entries this worker holds now.")

    def collect(self) -> Iterator[Metric]:
        counts = self._hold.counts
        jobs = CounterMetricFamily("dispatcher_jobs", "Jobs of this worker by outcome.", labels=["status"])
        for status in self.STATUSES:
            jobs.add_metric([status], getattr(counts, status))
        yield jobs
        yield GaugeMetricFamily("dispatcher_worker_entries_held", "Stream entries this worker holds now.",
                                value=len(self._hold.entries))
