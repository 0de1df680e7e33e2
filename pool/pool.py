"""SMTPPool: a bounded queue feeding ``size`` slots, each a worker owning one session.

    submit() -> queue -> worker(slot) -> Transaction.start() / finish() -> Outcome -> SendResult | error

A message is a ``_Job``. Its state (recipients still pending, accepted, refused,
attempts) changes only in the worker that holds it, or in ``_finish``. Transient
failures send the job through a backoff timer back into the queue, so a worker never
idles on a sleep while other messages wait.

Ownership: one supervisor task runs a ``TaskGroup`` holding every worker, backoff
timer and probe; ``close()`` and ``terminate()`` stop them by calls, never by markers
in the queue. A relay that cannot be reached holds the queue without spending the
messages' attempts (docs/library.md promise 10).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from email.message import Message
from typing import TYPE_CHECKING, Any

from pool.budget import ByteBudget
from pool.connection import Connection, ConnState, SessionOptions
from pool.envelope import Envelope, build_envelope, check_address, with_envelope_id
from pool.errors import (
    ConnectionFailed,
    DeliveryError,
    PoolClosedError,
    PoolError,
    Refusals,
    RelayError,
    SessionRefused,
    Withdrawn,
)
from pool.log import EventLogger, log
from pool.metrics import PoolMetrics
from pool.ratelimit import RateLimiter, SharedLimiter
from pool.results import SendResult
from pool.retry import backoff_delay, is_permanent
from pool.tls import check_ca_file
from pool.transaction import Outcome, Transaction

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pool.dkim import DKIMSigner
    from pool.oauth import OAuth2
    from pool.probe import RelayInfo


@dataclass(slots=True, eq=False)
class _Job:
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


class SMTPPool:
    """A pool of long-lived SMTP sessions. ``result = await pool.submit(message)``.

    See docs/library.md for every option. Use as ``async with SMTPPool(...) as pool``
    or call ``await pool.close()`` when done. ``rate_limiter`` takes a limiter shared
    with other processes (``async acquire()``), applied on top of ``rate_limit``.
    """

    def __init__(
        self,
        hostname: str = "localhost",
        port: int = 25,
        *,
        size: int = 4,
        use_tls: bool = False,
        start_tls: bool | None = None,
        validate_certs: bool = True,
        username: str | None = None,
        password: str | None = None,
        timeout: float = 30.0,
        max_messages_per_connection: int | None = None,
        idle_timeout: float | None = 60.0,
        max_attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        rate_limit: float | None = None,
        pipelining: bool | None = None,
        queue_size: int = 1000,
        max_bytes_in_flight: int = 256 << 20,
        registry: CollectorRegistry | None = None,
        local_hostname: str | None = None,
        ca_file: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        relay_down_timeout: float = 300.0,
        dkim: DKIMSigner | Sequence[DKIMSigner] | None = None,
        rate_limiter: SharedLimiter | None = None,
        oauth2: OAuth2 | None = None,
        pipeline_depth: int = 8,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if max_messages_per_connection is not None and max_messages_per_connection < 1:
            raise ValueError("max_messages_per_connection must be at least 1")
        if relay_down_timeout <= 0:
            raise ValueError("relay_down_timeout must be positive")
        if oauth2 is not None and (username is None or password is not None):
            raise ValueError("oauth2 needs a username (the mailbox it logs in as) and no password")
        if pipeline_depth < 1:
            raise ValueError("pipeline_depth must be at least 1")
        if ca_file is not None and tls_context is None:
            try:
                check_ca_file(ca_file)
            except ValueError as exc:
                raise ValueError(f"ca_file: {exc}") from None
        self.size = size
        self.queue_size = queue_size
        self.max_bytes_in_flight = max_bytes_in_flight
        self.max_messages_per_connection = max_messages_per_connection
        self.idle_timeout = idle_timeout
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.relay_down_timeout = relay_down_timeout
        self.pipeline_depth = pipeline_depth
        self.dkim = dkim
        self._sign: Callable[[bytes], bytes] | None = None
        if dkim is not None:
            from pool.dkim import signing  # dkimpy and cryptography only when signing

            self._sign = signing(dkim)
        self._options = SessionOptions(
            hostname=hostname,
            port=port,
            use_tls=use_tls,
            start_tls=start_tls,
            validate_certs=validate_certs,
            username=username,
            password=password,
            timeout=timeout,
            local_hostname=local_hostname or socket.gethostname() or "localhost",
            pipelining=pipelining,
            ca_file=ca_file,
            tls_context=tls_context,
            oauth2=oauth2,
            pipeline_depth=pipeline_depth,
        )
        if not validate_certs and (use_tls or start_tls is not False):
            log.warning("smtp.validate_certs_off", relay=self._options.relay,
                        detail="the relay's TLS certificate is not verified")
        self.rate = RateLimiter(rate_limit)
        self._shared_limiter = rate_limiter
        # New submissions wait for room in the bounded queue; a job coming back from a
        # failed connect or a backoff must never wait, so when the queue is full it goes
        # to ``_retry``, which workers read first (a full queue means no worker is waiting).
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        # Bytes of the messages submitted and not yet ended: with large messages the
        # queue's length alone would let memory grow with message size x queue_size.
        if max_bytes_in_flight < 1:
            raise ValueError("max_bytes_in_flight must be at least 1")
        self._bytes = ByteBudget(max_bytes_in_flight)
        self._retry: deque[_Job] = deque()
        self._slots = [Connection(self._options) for _ in range(size)]
        self.max_open = 0  # most sessions ever open at once: for tests and stats
        self.metrics = PoolMetrics(
            registry, queue_depth=self.queue_depth, connections_open=self.connections_open,
            rate_current=lambda: self.rate.current, relay_up=self._relay_up,
        )
        self._rng = random.Random()
        self._supervisor: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._timers: dict[asyncio.Task[None], _Job] = {}  # backoff timers and the job each holds
        self._stopping = asyncio.Event()
        self._unfinished = 0
        self._admitting = 0  # submits waiting for room under max_bytes_in_flight
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False  # no new submissions
        self._stopped: PoolError | None = None  # why waiting jobs fail: closed, crashed
        self._halted = asyncio.Event()  # set with _stopped
        self._relay_error: RelayError | None = None
        self._down_since: float | None = None  # first failed connect while no session was up
        self._connect_failures = 0  # in a row
        self._first_session = asyncio.Lock()

    @classmethod
    def from_config(cls, settings: Any, **overrides: Any) -> SMTPPool:
        """Build a pool from a settings object with ``smtp``, ``pool`` and ``retry``
        sections (``dispatcher.config.Settings``; docs/configuration.md)."""
        from pool.config import pool_kwargs

        if settings.smtp is None:
            raise ValueError("smtp: no relay configured")
        return cls(**{**pool_kwargs(settings.smtp, settings.pool, settings.retry), **overrides})

    async def probe(self) -> RelayInfo:
        """Open one session as this pool would (TLS, EHLO, AUTH), report what the relay
        offers and QUIT, sending nothing. The pool need not be started. Raises
        ``RelayError`` (``transient=False``: the relay refuses the session for good)."""
        from pool.probe import probe_session

        return await probe_session(self._options)

    def __repr__(self) -> str:
        states = [slot.state for slot in self._slots]
        state = "closed" if self._closing and self._supervisor is None else (
            "closing" if self._closing else "running" if self._supervisor else "new")
        relay = "" if self._relay_error is None else f" relay_error={self._relay_error!r}"
        return (f"<SMTPPool {self._options.relay} {state} size={self.size} "
                f"busy={states.count(ConnState.BUSY)} idle={states.count(ConnState.IDLE)} "
                f"queued={self.queue_depth()} unfinished={self._unfinished}{relay}>")

    # -- lifecycle --

    async def __aenter__(self) -> SMTPPool:
        if not self._closing:
            self._start()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # A cancelled owner must not wait for the whole queue to drain.
        await self.close(drain=exc_type is not asyncio.CancelledError)

    def queue_depth(self) -> int:
        """Messages waiting for a session now."""
        return self._queue.qsize() + len(self._retry)

    async def connect(self) -> None:
        """Open a session now, before any message: a batch learns that the login is
        wrong or the relay is down before it reads a job. Returns once a session is
        open. Raises RelayError when the relay refuses the session, or stays
        unreachable for ``relay_down_timeout``; PoolClosedError when the pool is closed."""
        self._check_open()
        self._start()
        slot = self._slots[0]
        bound = log.bind(connection=slot.id)
        while True:
            async with self._first_session:  # the workers' first connect waits on it too
                if any(s.is_connected for s in self._slots):
                    return
                if (refusal := self._no_connect()) is not None:
                    raise refusal
                delay = await self._open(slot, bound)
                if delay is None:
                    return
                if self._relay_error is not None:
                    raise _fresh(self._relay_error)
            await asyncio.sleep(delay)

    def connections_open(self) -> int:
        """SMTP sessions open or opening now (never more than ``size``)."""
        return sum(1 for slot in self._slots if slot.is_open)

    def _relay_up(self) -> float:
        """The ``smtp_pool_relay_up`` gauge: 0 from the first failed connect or refused
        session while no session is open (not only once ``relay_down_timeout`` has
        run out: an alert needs the outage while it lasts), 1 again when one opens."""
        down = self._relay_error is not None or self._down_since is not None
        return 0.0 if down and not any(slot.is_connected for slot in self._slots) else 1.0

    @property
    def relay_error(self) -> RelayError | None:
        """Set while the relay is down or refuses the session (docs/library.md promise 10)."""
        return self._relay_error

    def _start(self) -> asyncio.Task[None]:
        """The supervisor task, started on first use. Call only while open."""
        if self._supervisor is None:
            self._supervisor = asyncio.create_task(self._supervise(), name="smtp-pool")
        return self._supervisor

    async def _supervise(self) -> None:
        """Own every task of the pool: workers, backoff timers. Ends when told to."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                self._workers = [
                    group.create_task(self._worker(slot), name=f"smtp-pool-worker-{slot.id}")
                    for slot in self._slots
                ]
                await self._stopping.wait()
                # Every job has ended: the workers wait for work, or probe; stop them there.
                for task in (*self._workers, *self._timers):
                    task.cancel()
        except Exception as exc:  # noqa: BLE001 - turned into an error for every waiting caller
            # A bug in a worker: the group has cancelled the others. Nothing may wait forever.
            log.error("smtp.pool_crashed", error=repr(exc))
            self._fail_waiting(PoolError(f"the pool stopped after an internal error: {exc!r}"))
        finally:
            self._group = None
            await asyncio.gather(*(slot.quit() for slot in self._slots), return_exceptions=True)

    async def close(self, drain: bool = True) -> None:
        """Stop taking messages. ``drain=True`` sends everything already submitted;
        ``drain=False`` fails the waiting with PoolClosedError and finishes only the
        transactions on the wire. Then every session is ended with QUIT. Safe to call
        again, concurrently, or after a cancelled close (which terminates the pool)."""
        self._closing = True
        if not drain:
            self._fail_waiting(PoolClosedError("the pool closed before this message was sent"))
        supervisor = self._supervisor
        if supervisor is None:
            self._fail_waiting(PoolClosedError("the pool closed before this message was sent"))
            return
        try:
            await self._drained.wait()
            self._stopping.set()
            await asyncio.shield(supervisor)
        except asyncio.CancelledError:
            # asyncpg's rule: a close that cannot finish falls back to terminate.
            self.terminate()
            raise

    def terminate(self) -> None:
        """Drop every session at once, without QUIT (a second Ctrl-C). Messages queued
        or on the wire fail with PoolClosedError: the server may or may not have those
        that were on the wire."""
        self._closing = True
        self._fail_waiting(PoolClosedError("the pool was terminated before this message was sent"))
        for slot in self._slots:
            slot.close()
        for task in self._workers:
            task.cancel()
        self._stopping.set()

    def _fail_waiting(self, error: PoolError) -> None:
        """Fail every job not on the wire, queued or backing off, with ``error``. Unless
        it is the relay's (which may recover), the pool stops retrying for good."""
        if self._stopped is None and not isinstance(error, RelayError):
            self._stopped = error
            self._halted.set()  # workers holding a job for the rate limiter give it up
        while self._retry:
            self._finish(self._retry.popleft(), stopped=error)
        while not self._queue.empty():
            job = self._queue.get_nowait()
            job.taken = True
            self._finish(job, stopped=error)
        for timer, job in list(self._timers.items()):
            job.stop_reason = error  # the timer finishes its job with it when cancelled
            timer.cancel()

    # -- submit --

    async def submit(
        self,
        message: Message | bytes | str | Envelope,
        *,
        sender: str | None = None,
        recipients: list[str] | tuple[str, ...] | None = None,
        prepared: bool = False,
        admit: Callable[[], bool] | None = None,
        envelope_id: str | None = None,
    ) -> SendResult:
        """Send one message. Returns a SendResult when at least one recipient accepted.

        Raises DeliveryError when none did, RelayError when the relay is down or
        refuses the session, PoolClosedError when the pool is closed, ValueError at
        once for bad input. Waits while the queue is full, or while the message's bytes
        would exceed ``max_bytes_in_flight`` (a larger one waits to go alone). ``prepared=True`` says that
        ``message`` (bytes) has CRLF line endings only and ends with one, as
        ``dispatcher.compose.mime`` builds it: it is not scanned for bare line ends again.
        ``message`` may also be an ``Envelope`` that ``pool.prepare`` made ahead, off
        the event loop (then without ``sender`` and ``recipients``).
        ``admit()``, when given, is called right before each attempt goes on the wire
        (a slot has taken the message, it has waited for the rate limit): False raises
        Withdrawn and the message is not sent, for a caller whose right to send it can
        lapse while it waits in the queue (a Redis worker that was paused).
        ``envelope_id``: when the relay offers DSN (RFC 3461), MAIL carries
        ``RET=HDRS ENVID=envelope_id`` and each RCPT ``NOTIFY=FAILURE,DELAY
        ORCPT=rfc822;ADDR``, so that a bounce names the message and the recipient.
        """
        if isinstance(message, Envelope):  # prepared ahead (pool.prepare): sent as it is
            if sender is not None or recipients is not None or self.dkim is not None:
                raise ValueError("an Envelope carries its own sender and recipients, and is sent unsigned: "
                                 "sign the message before pool.prepare")
            envelope = _checked(message)
        else:
            envelope = build_envelope(message, sender, recipients, sign=self._sign, prepared=prepared)
        envelope = with_envelope_id(envelope, envelope_id)
        self._check_open()
        self._start()
        size = len(envelope.content)
        # Waiting for room is part of being submitted: a draining close() waits for
        # these too (else one that got its room after close() had returned would wait
        # for ever on a stopped pool).
        self._admitting += 1
        self._drained.clear()
        try:
            await self._bytes.acquire(size)
        except BaseException:
            self._admitting -= 1
            self._settle_drained()
            raise
        self._admitting -= 1  # and _submit counts it unfinished before its first await
        try:
            return await self._submit(envelope, admit)
        finally:
            self._bytes.release(size)

    async def _submit(self, envelope: Envelope, admit: Callable[[], bool] | None) -> SendResult:
        # The supervisor's loop is the running one; asking it costs no getpid() syscall.
        job = _Job(envelope, self._start().get_loop().create_future(), time.monotonic(), envelope.recipients,
                   admit=admit)
        self._unfinished += 1
        if self._unfinished == 1:
            self._drained.clear()
        try:
            if self._queue.full():
                await self._queue.put(job)
            else:
                self._queue.put_nowait(job)
        except BaseException:
            self._job_done()  # cancelled while the queue was full: never queued, never sent
            raise
        # Submitted before a draining close() it is still sent; not after a stop.
        reason = self._stopped or self._relay_error
        if reason is not None:
            self._fail_waiting(reason)
        try:
            return await job.future
        except asyncio.CancelledError:
            if not job.taken and not job.future.done():
                # Still queued: the worker that takes it will see the future cancelled.
                job.future.cancel()
            raise

    def _check_open(self) -> None:
        if self._relay_error is not None:
            raise _fresh(self._relay_error)
        if self._closing:
            raise PoolClosedError("the pool is closed")

    def _requeue(self, job: _Job) -> None:
        """Back in line without waiting for room (its room was given back when taken)."""
        try:
            self._queue.put_nowait(job)
        except asyncio.QueueFull:
            self._retry.append(job)

    def _take(self) -> _Job:
        job = self._retry.popleft() if self._retry else self._queue.get_nowait()
        job.taken = True
        return job

    # -- workers --

    async def _worker(self, slot: Connection) -> None:
        """Take jobs one after another on this slot's session.

        With a pipelined session, the next job's envelope is written before the
        previous job's end-of-DATA reply is read (``window``), when the queue already
        holds it: the two share one round trip. With BDAT (the relay offers CHUNKING),
        up to ``pipeline_depth`` whole transactions are on the wire at once, their
        replies read in order.
        """
        bound = log.bind(connection=slot.id)
        job: _Job | None = None
        window: deque[tuple[_Job, Transaction, float]] = deque()  # on the wire, oldest first
        try:
            while True:
                if window and ((self._queue.empty() and not self._retry) or self._must_recycle(slot)
                               or len(window) >= (self.pipeline_depth if slot.bdat else 2)):
                    await self._complete(window, slot, bound)
                    continue
                job = self._take() if window else await self._next_job(slot, bound)
                if job.future.done():  # cancelled by its caller while queued
                    self._job_done()
                    job = None
                    continue
                if self.rate.current != _UNLIMITED or self._shared_limiter is not None:
                    while window:
                        await self._complete(window, slot, bound)
                    # Taken but not on the wire: a stop (close without drain, a
                    # permanent refusal) must not wait for the limiter, nor send after it.
                    paced = await self._unless_halted(self.rate.acquire())
                    if paced and self._shared_limiter is not None:
                        paced = await self._unless_halted(self._shared_limiter.acquire())
                    if not paced or self._stopped is not None:
                        held, job = job, None
                        self._finish(held, stopped=self._stopped or PoolClosedError("the pool closed"))
                        continue
                while window and not slot.is_connected:
                    # The server closed the session behind the messages on the wire: the
                    # next one gets a new session instead of spending an attempt on this one.
                    await self._complete(window, slot, bound)
                if not window:
                    wait = await self._ready(slot, job, bound)
                    if wait is not None:  # no session: the job is back in the queue, or failed
                        job = None
                        await asyncio.sleep(wait)
                        continue
                # Asked last, right before the first byte goes out: connecting (TLS, AUTH, a
                # token fetch) and the rate limiter may have taken long enough for the
                # submitter to lose its claim on the message (a paused Redis worker).
                if job.admit is not None:
                    refusal = _admission(job.admit)
                    if refusal is not None:
                        withdrawn, job = job, None
                        self._finish(withdrawn, stopped=refusal)
                        continue
                job.attempts += 1
                started = time.monotonic()
                slot.begin(started)
                transaction = Transaction(slot, job.envelope, job.pending)
                await transaction.start()
                if not transaction.open or not transaction.bdat:
                    # DATA: its 354 came after every earlier reply; those are in now.
                    while window:
                        await self._complete(window, slot, bound)
                if transaction.open:
                    window.append((job, transaction, started))
                else:
                    assert transaction.outcome is not None
                    self._route(job, transaction.outcome, slot, started, bound)
                job = None
        except BaseException as exc:
            # Stopped while idle (close: the supervisor QUITs the session), terminated, or
            # a bug: nothing on the wire may be left half done, and nobody may wait forever.
            if slot.state is not ConnState.IDLE or job is not None or window:
                slot.close()
            stopped = self._stopped or (PoolClosedError("the pool was terminated")
                                        if isinstance(exc, asyncio.CancelledError)
                                        else PoolError(f"the pool stopped after an internal error: {exc!r}"))
            for stranded in (job, *(held for held, _, _ in window)):
                if stranded is not None:
                    self._finish(stranded, stopped=stopped)
            raise

    async def _unless_halted(self, wait: Coroutine[Any, Any, None]) -> bool:
        """Await ``wait`` (a rate limiter's) unless the pool stops sending first: False then."""
        if self._halted.is_set():
            wait.close()
            return False
        pacing = asyncio.ensure_future(wait)
        halted = asyncio.ensure_future(self._halted.wait())
        try:
            await asyncio.wait((pacing, halted), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (pacing, halted):
                task.cancel()  # no-op for the one that is done; awaited below either way
            await asyncio.gather(pacing, halted, return_exceptions=True)
        if pacing.cancelled():
            return False
        pacing.result()  # a limiter's own error (Redis gone for good) is the worker's to raise
        return True

    async def _next_job(self, slot: Connection, bound: EventLogger) -> _Job:
        """The next queued job. An idle session is QUIT after ``idle_timeout``; while
        the relay is down, the first slot probes it every ``backoff_max`` seconds."""
        while True:
            wait = self.idle_timeout if slot.is_connected else None
            probing = self._relay_error is not None and self._relay_error.transient and slot is self._slots[0]
            if probing or (wait is None and slot is self._slots[0]):
                # The first slot never blocks for good: the relay may be declared down
                # while it waits, and then no job will come to wake it.
                wait = self.backoff_max if wait is None else min(wait, self.backoff_max)
            if self._retry:
                return self._take()
            if wait is None:
                job = await self._queue.get()
                job.taken = True
                return job
            try:
                async with asyncio.timeout(wait):
                    job = await self._queue.get()
                    job.taken = True
                    return job
            except TimeoutError:
                if probing:
                    await self._probe(slot, bound)
                elif slot.is_connected and self.idle_timeout is not None and slot.idle_for() >= self.idle_timeout:
                    bound.info("smtp.idle_close", idle_for=round(slot.idle_for(), 3))
                    await slot.quit()

    def _must_recycle(self, slot: Connection) -> bool:
        limit = self.max_messages_per_connection
        return limit is not None and slot.transactions >= limit

    async def _ready(self, slot: Connection, job: _Job, bound: EventLogger) -> float | None:
        """Make sure the slot holds a usable session for ``job``; None when it does.
        On a failed connect the job goes back to the queue without spending an attempt
        (or fails with the relay's error) and the seconds the slot must wait before
        trying again are returned."""
        if slot.is_connected and self._must_recycle(slot):
            bound.debug("smtp.recycle", transactions=slot.transactions)
            await slot.quit()
        if slot.is_connected:
            return None
        if (refusal := self._no_connect()) is not None:
            self._finish(job, stopped=refusal)
            return 0.0
        if self.metrics.connects == 0:
            # Until one session has opened, slots connect one at a time: a wrong
            # password costs one failed login, not one per slot (or per message).
            async with self._first_session:
                if (refusal := self._no_connect()) is not None:
                    self._finish(job, stopped=refusal)
                    return 0.0
                if self.metrics.connects == 0:
                    return await self._connect(slot, job, bound)
        return await self._connect(slot, job, bound)

    def _no_connect(self) -> PoolError | None:
        """Why no session may be opened now: the pool stopped, or the relay refused it
        for good (connecting again would only repeat a failed login)."""
        if self._stopped is not None:
            return _fresh(self._stopped)
        if self._relay_error is not None and not self._relay_error.transient:
            return _fresh(self._relay_error)
        return None

    async def _connect(self, slot: Connection, job: _Job, bound: EventLogger) -> float | None:
        """Open ``slot``'s session for ``job``: None once open; else the job is failed
        (relay refused or down, pool stopped) or back in the queue, and the delay."""
        delay = await self._open(slot, bound)
        if delay is None:
            return None
        if self._relay_error is not None:  # always so after a refused session
            self._finish(job, stopped=_fresh(self._relay_error))
        elif self._stopped is not None:
            self._finish(job, stopped=self._stopped)
        else:
            self._requeue(job)
        return delay

    async def _open(self, slot: Connection, bound: EventLogger) -> float | None:
        """Open ``slot``'s session, counting and logging a failure: None once it is
        open, else how long before the next try (0 after a refused session)."""
        self.max_open = max(self.max_open, self.connections_open() + 1)
        try:
            await slot.connect()
        except ConnectionFailed as exc:
            self.metrics.connect_errors += 1
            # The first failure of an outage is news; the retries that follow are not.
            (bound.warning if self._connect_failures == 0 else bound.debug)(
                "smtp.connect_error", error=exc.reason, relay=self._options.relay)
            return self._connect_failed(exc)
        except SessionRefused as exc:
            self.metrics.connect_errors += 1
            self._refused(exc, bound)
            return 0.0
        self._connected(slot, bound)
        return None

    async def _probe(self, slot: Connection, bound: EventLogger) -> None:
        try:
            await slot.connect()
        except ConnectionFailed as exc:
            self.metrics.connect_errors += 1
            bound.info("smtp.probe_failed", error=exc.reason, relay=self._options.relay)
        except SessionRefused as exc:
            self.metrics.connect_errors += 1
            self._refused(exc, bound)
        else:
            self._connected(slot, bound)

    def _connected(self, slot: Connection, bound: EventLogger) -> None:
        self.metrics.connects += 1
        if self._relay_error is not None:
            bound.warning("smtp.relay_up", relay=self._options.relay)
        self._relay_error = None
        self._down_since = None
        self._connect_failures = 0
        bound.info("smtp.connect", relay=self._options.relay, pipelining=slot.pipelined)

    def _connect_failed(self, exc: ConnectionFailed) -> float:
        """Count a failed connect; declare the relay down after ``relay_down_timeout``
        without a session. Returns how long this slot waits before its next try."""
        now = time.monotonic()
        self._connect_failures += 1
        if any(slot.is_connected for slot in self._slots):
            self._down_since = None  # another session works: a blip, not an outage
        elif self._down_since is None:
            self._down_since = now
        if self._down_since is not None and self._relay_error is None:
            down_for = now - self._down_since
            if down_for >= self.relay_down_timeout:
                self._relay_error = RelayError(
                    f"relay {self._options.relay} unreachable for {down_for:.0f} s: {exc.reason}",
                    transient=True, relay=self._options.relay, code=exc.code,
                )
                log.error("smtp.relay_down", relay=self._options.relay, down_for=round(down_for, 1),
                          error=exc.reason)
                self._fail_waiting(self._relay_error)
        delay = backoff_delay(self._connect_failures, self.backoff_base, self.backoff_max, self._rng)
        if self._down_since is not None and self._relay_error is None:
            delay = min(delay, max(0.0, self._down_since + self.relay_down_timeout - now))
        return max(delay, min(self.backoff_base, 0.05))  # never a busy loop of connects

    def _refused(self, exc: SessionRefused, bound: EventLogger) -> None:
        """A permanent session failure: stop connecting; fail everything waiting."""
        bound.error("smtp.session_refused", relay=self._options.relay, error=exc.reason, code=exc.code)
        if self._relay_error is None or self._relay_error.transient:
            self._relay_error = RelayError(exc.reason, transient=False, relay=self._options.relay, code=exc.code)
        self._fail_waiting(self._relay_error)

    async def _complete(
        self, window: deque[tuple[_Job, Transaction, float]], slot: Connection, bound: EventLogger
    ) -> None:
        """Read the oldest transaction's last replies and route its outcome. It leaves
        the window only then: cancelled while waiting, it is still there, stranded."""
        job, transaction, started = window[0]
        outcome = await transaction.finish()
        window.popleft()
        self._route(job, outcome, slot, started, bound)

    # -- outcomes --

    def _route(self, job: _Job, outcome: Outcome, slot: Connection, started: float, bound: EventLogger) -> None:
        """Fold one attempt's outcome into the job: finished, or retried after a backoff."""
        now = time.monotonic()
        slot.end(now)  # this transaction is off the wire
        metrics = self.metrics
        metrics.observe_transaction(now - started)
        if outcome.delivered is not None:
            metrics.reply(outcome.delivered[0])
            job.accepted.extend(outcome.accepted)
            job.delivered = outcome.delivered
            job.last_code, job.last_response = outcome.delivered
        for code, _ in outcome.refused.values():
            metrics.reply(code)
        job.refused.update(outcome.refused)
        if outcome.reply[0] is not None or outcome.reply[1]:
            job.last_code, job.last_response = outcome.reply
        if outcome.throttled and self.rate.throttled():
            bound.warning("smtp.throttled", rate=round(self.rate.current, 2), code=job.last_code,
                          response=job.last_response)
        if outcome.unsent:
            job.attempts -= 1  # it never reached the server: no attempt was made
        if outcome.ambiguous:
            job.maybe_delivered = True
            metrics.ambiguous += 1
            bound.warning("smtp.ambiguous", message_id=job.envelope.message_id, attempt=job.attempts,
                          reason=job.last_response)
        job.pending = tuple(outcome.deferred)
        job.deferred = outcome.deferred
        if outcome.deferred:
            self._deferred(job, outcome.deferred, bound)
        else:
            self._finish(job)

    def _deferred(self, job: _Job, deferred: Refusals, bound: EventLogger) -> None:
        """Retry the pending recipients after a backoff, or give up on them."""
        reason = self._stopped or self._relay_error
        if job.attempts >= self.max_attempts or job.future.done() or reason is not None:
            for rcpt in job.pending:
                code, _ = job.refused[rcpt] = deferred[rcpt]
                self.metrics.reply(code)
            job.pending = ()
            if job.attempts >= self.max_attempts:
                bound.warning("smtp.give_up", message_id=job.envelope.message_id, attempts=job.attempts,
                              code=job.last_code, response=job.last_response)
            self._finish(job, stopped=_fresh(reason) if reason is not None else None)
            return
        # An attempt given back (it never reached the server) waits as after a first one.
        delay = backoff_delay(max(1, job.attempts), self.backoff_base, self.backoff_max, self._rng)
        self.metrics.retries += 1
        bound.info("smtp.retry", message_id=job.envelope.message_id, attempt=job.attempts,
                   delay=round(delay, 3), code=job.last_code, response=job.last_response,
                   recipients=len(job.pending))
        group = self._group
        if group is None:  # the pool is going away
            self._finish(job, stopped=self._stopped or PoolClosedError("the pool closed"))
            return
        timer = group.create_task(self._requeue_after(job, delay))
        self._timers[timer] = job
        timer.add_done_callback(self._timer_done)

    def _timer_done(self, timer: asyncio.Task[None]) -> None:
        job = self._timers.pop(timer, None)
        if job is not None and timer.cancelled():
            # Closed without drain, terminated or relay down while backing off (perhaps
            # before the timer ever ran: only this callback is sure to): nothing of this
            # job is on the wire.
            self._finish(job, stopped=job.stop_reason or self._stopped or PoolClosedError("the pool closed"))

    async def _requeue_after(self, job: _Job, delay: float) -> None:
        await asyncio.sleep(delay)
        timer = asyncio.current_task()
        if timer is not None:
            self._timers.pop(timer, None)  # from here on this job is the queue's, not the timer's
        reason = self._stopped or self._relay_error
        if reason is not None:
            self._finish(job, stopped=_fresh(reason))
        else:
            self._requeue(job)

    def _finish(self, job: _Job, *, stopped: PoolError | None = None) -> None:
        """Resolve the caller's future with the job's outcome (exactly once).

        ``stopped``: why the pool will not try the pending recipients again; it is the
        error raised unless a recipient accepted (SendResult) or every recipient was
        refused for good (DeliveryError, permanent).
        """
        if not job.future.done():
            for rcpt in job.pending:
                job.refused.setdefault(rcpt, job.deferred.get(rcpt, (job.last_code or 0, job.last_response)))
            elapsed = time.monotonic() - job.submitted
            if job.accepted:
                code, response = job.delivered or (250, "")
                # The job ends here: its list and dict go to the caller, not copies.
                job.future.set_result(SendResult(
                    message_id=job.envelope.message_id, accepted=job.accepted, refused=job.refused,
                    code=code, response=response, attempts=job.attempts, elapsed=elapsed,
                ))
                self.metrics.sent += 1
            else:
                permanent = bool(job.refused) and all(is_permanent(c) for c, _ in job.refused.values())
                if stopped is not None and not (permanent and job.attempts):
                    stopped = _fresh(stopped)
                    if isinstance(stopped, RelayError):
                        # What a router needs to send the rest elsewhere, and only the rest.
                        stopped.refused = {r: c for r, c in job.refused.items() if is_permanent(c[0])}
                        stopped.recipients = tuple(r for r in job.envelope.recipients if r not in stopped.refused)
                        stopped.maybe_delivered = job.maybe_delivered
                    job.future.set_exception(stopped)  # not sent, not failed: nothing to count
                else:
                    self.metrics.failed += 1
                    job.future.set_exception(DeliveryError(
                        f"not delivered: {job.last_code} {job.last_response}" if job.last_code
                        else f"not delivered: {job.last_response}",
                        code=job.last_code, response=job.last_response, permanent=permanent,
                        attempts=job.attempts, refused=job.refused, message_id=job.envelope.message_id,
                    ))
            self.metrics.observe_send(elapsed)
        self._job_done()

    def _job_done(self) -> None:
        self._unfinished -= 1
        self._settle_drained()

    def _settle_drained(self) -> None:
        if self._unfinished == 0 and self._admitting == 0:
            self._drained.set()


_UNLIMITED = float("inf")


def _checked(envelope: Envelope) -> Envelope:
    """An Envelope built by hand, checked as submit checks its arguments: addresses
    safe on a command line, and ``all_ascii`` true only when it is (or a UTF-8
    address would go out without SMTPUTF8)."""
    check_address(envelope.sender, "sender")
    for recipient in envelope.recipients:
        check_address(recipient, "recipients")
    if not envelope.recipients:
        raise ValueError("recipients: at least one is needed")
    if envelope.all_ascii and not (envelope.sender.isascii() and all(r.isascii() for r in envelope.recipients)):
        envelope = dataclasses.replace(envelope, all_ascii=False)
    return envelope


def _admission(admit: Callable[[], bool]) -> PoolError | None:
    """Why the submitter's ``admit()`` withholds its message now, or None to send it.
    Its own exception fails that message alone: the session, and the transactions
    already on its wire, are not the pool's to give up for it."""
    try:
        if admit():
            return None
    except Exception as exc:  # noqa: BLE001 - the caller's callback: any error of its is its message's
        return PoolError(f"not sent: its admit() raised {exc!r}")
    return Withdrawn("withdrawn by its submitter before it was sent")


def _fresh(error: PoolError) -> PoolError:
    """A copy of a shared error, so that many callers raising it do not share (and
    grow) one traceback."""
    if isinstance(error, RelayError):
        return RelayError(str(error), transient=error.transient, relay=error.relay, code=error.code)
    return type(error)(*error.args)
