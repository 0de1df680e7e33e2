"""SMTPPool: a bounded queue feeding ``size`` slots, each a worker owning one session.

    submit() -> queue -> worker(slot) -> Transaction.start() / finish() -> Outcome -> SendResult | error

A message is a ``Job`` (pool/slot.py). Its state (recipients still pending, accepted,
refused, attempts) changes only in the worker of the slot that holds it, or in
``_finish``. Transient failures send the job through a backoff timer back into the
queue, so a worker never idles on a sleep while other messages wait. What the pool
knows of its relay (up, failing, down, refused) is one ``RelayHealth`` (pool/health.py).

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
from collections.abc import Callable, Coroutine, Sequence
from email.message import Message
from typing import TYPE_CHECKING, Any, Protocol

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
from pool.health import RelayHealth
from pool.log import EventLogger, log
from pool.metrics import PoolMetrics
from pool.queue import JobQueue
from pool.ratelimit import RateLimiter, SharedLimiter
from pool.results import SendResult
from pool.retry import backoff_delay, is_permanent
from pool.slot import Job, Slot
from pool.tls import check_ca_file
from pool.transaction import Outcome, Transaction

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from pool.config import PoolSettings, RetrySettings, SMTPSettings
    from pool.dkim import DKIMSigner
    from pool.oauth import OAuth2
    from pool.probe import RelayInfo


class PoolConfig(Protocol):
    """What ``SMTPPool.from_config`` reads: a settings object with the pool's three
    sections (``dispatcher.config.Settings`` is one)."""

    @property
    def smtp(self) -> SMTPSettings | None: ...

    @property
    def pool(self) -> PoolSettings: ...

    @property
    def retry(self) -> RetrySettings: ...


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
        _check_options(size=size, max_attempts=max_attempts, queue_size=queue_size,
                       max_messages_per_connection=max_messages_per_connection,
                       relay_down_timeout=relay_down_timeout, pipeline_depth=pipeline_depth,
                       max_bytes_in_flight=max_bytes_in_flight)
        if oauth2 is not None and (username is None or password is not None):
            raise ValueError("oauth2 needs a username (the mailbox it logs in as) and no password")
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
        # failed connect or a backoff never waits (JobQueue.put_back).
        self._queue = JobQueue(queue_size)
        # Bytes of the messages submitted and not yet ended: with large messages the
        # queue's length alone would let memory grow with message size x queue_size.
        self._bytes = ByteBudget(max_bytes_in_flight)
        self._slots = [_slot(Connection(self._options)) for _ in range(size)]
        self.max_open = 0  # most sessions ever open at once: for tests and stats
        self.metrics = PoolMetrics(
            registry, queue_depth=self.queue_depth, connections_open=self.connections_open,
            rate_current=lambda: self.rate.current, relay_up=self._relay_up,
        )
        self._rng = random.Random()
        self._health = RelayHealth(self._options.relay, down_timeout=relay_down_timeout, backoff_base=backoff_base,
                                   backoff_max=backoff_max, rng=self._rng)
        self._supervisor: asyncio.Task[None] | None = None
        self._group: asyncio.TaskGroup | None = None
        self._workers: list[asyncio.Task[None]] = []
        self._timers: dict[asyncio.Task[None], Job] = {}  # backoff timers and the job each holds
        self._stopping = asyncio.Event()
        self._unfinished = 0
        self._admitting = 0  # submits waiting for room under max_bytes_in_flight
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False  # no new submissions
        self._stopped: PoolError | None = None  # why waiting jobs fail: closed, crashed
        self._halted = asyncio.Event()  # set with _stopped
        self._first_session = asyncio.Lock()

    @classmethod
    def from_settings(
        cls,
        smtp: SMTPSettings,
        pool: PoolSettings | None = None,
        retry: RetrySettings | None = None,
        *,
        registry: CollectorRegistry | None = None,
        rate_limiter: SharedLimiter | None = None,
        dkim: DKIMSigner | Sequence[DKIMSigner] | None = None,
        tls_context: ssl.SSLContext | None = None,
    ) -> SMTPPool:
        """A pool for the configuration's ``smtp``, ``pool`` and ``retry`` sections
        (docs/configuration.md; a section left out takes its defaults), with what a file
        cannot hold given here."""
        from pool.config import PoolSettings, RetrySettings, oauth2_login

        pool = pool if pool is not None else PoolSettings.model_validate({})
        retry = retry if retry is not None else RetrySettings.model_validate({})
        return cls(
            smtp.hostname, smtp.port, use_tls=smtp.use_tls, start_tls=smtp.start_tls,
            validate_certs=smtp.validate_certs, ca_file=None if smtp.ca_file is None else str(smtp.ca_file),
            username=smtp.username, password=None if smtp.password is None else smtp.password.get_secret_value(),
            oauth2=None if smtp.oauth2 is None else oauth2_login(smtp.oauth2), timeout=smtp.timeout,
            relay_down_timeout=smtp.relay_down_timeout,
            size=pool.size, max_messages_per_connection=pool.max_messages_per_connection,
            idle_timeout=pool.idle_timeout, rate_limit=pool.rate_limit, queue_size=pool.queue_size,
            max_bytes_in_flight=pool.max_bytes_in_flight, pipelining=pool.pipelining,
            pipeline_depth=pool.pipeline_depth,
            max_attempts=retry.max_attempts, backoff_base=retry.backoff_base, backoff_max=retry.backoff_max,
            registry=registry, rate_limiter=rate_limiter, dkim=dkim, tls_context=tls_context,
        )

    @classmethod
    def from_config(cls, settings: PoolConfig, *, registry: CollectorRegistry | None = None) -> SMTPPool:
        """A pool from a settings object with ``smtp``, ``pool`` and ``retry`` sections
        (``dispatcher.config.Settings``). Raises ValueError when ``smtp`` is not set."""
        if settings.smtp is None:
            raise ValueError("smtp: no relay configured")
        return cls.from_settings(settings.smtp, settings.pool, settings.retry, registry=registry)

    async def probe(self) -> RelayInfo:
        """Open one session as this pool would (TLS, EHLO, AUTH), report what the relay
        offers and QUIT, sending nothing. The pool need not be started. Raises
        ``RelayError`` (``transient=False``: the relay refuses the session for good)."""
        from pool.probe import probe_session

        return await probe_session(self._options)

    def __repr__(self) -> str:
        states = [slot.connection.state for slot in self._slots]
        state = "closed" if self._closing and self._supervisor is None else (
            "closing" if self._closing else "running" if self._supervisor else "new")
        relay = "" if self._health.error is None else f" relay_error={self._health.error!r}"
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
        return len(self._queue)

    async def connect(self) -> None:
        """Open a session now, before any message: a batch learns that the login is
        wrong or the relay is down before it reads a job. Returns once a session is
        open. Raises RelayError when the relay refuses the session, or stays
        unreachable for ``relay_down_timeout``; PoolClosedError when the pool is closed."""
        self._check_open()
        self._start()
        slot = self._slots[0]
        while True:
            async with self._first_session:  # the workers' first connect waits on it too
                if self._session_open():
                    return
                if (refusal := self._no_connect()) is not None:
                    raise refusal
                delay = await self._open(slot.connection, slot.log)
                if delay is None:
                    return
                if self._health.error is not None:
                    raise _fresh(self._health.error)
            await asyncio.sleep(delay)

    def connections_open(self) -> int:
        """SMTP sessions open or opening now (never more than ``size``)."""
        return sum(1 for slot in self._slots if slot.connection.is_open)

    def _session_open(self) -> bool:
        return any(slot.connection.is_connected for slot in self._slots)

    def _relay_up(self) -> float:
        """The ``smtp_pool_relay_up`` gauge (``RelayHealth.up_gauge``)."""
        return self._health.up_gauge(self._session_open())

    @property
    def relay_error(self) -> RelayError | None:
        """Set while the relay is down or refuses the session (docs/library.md promise 10)."""
        return self._health.error

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
                    group.create_task(self._worker(slot), name=f"smtp-pool-worker-{slot.connection.id}")
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
            await asyncio.gather(*(slot.connection.quit() for slot in self._slots), return_exceptions=True)

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
            slot.connection.close()
        for task in self._workers:
            task.cancel()
        self._stopping.set()

    def _fail_waiting(self, error: PoolError) -> None:
        """Fail every job not on the wire, queued or backing off, with ``error``. Unless
        it is the relay's (which may recover), the pool stops retrying for good."""
        if self._stopped is None and not isinstance(error, RelayError):
            self._stopped = error
            self._halted.set()  # workers holding a job for the rate limiter give it up
        for job in self._queue.drain():
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
        if isinstance(message, Envelope):
            envelope = self._prepared(message, sender, recipients)
        else:
            envelope = build_envelope(message, sender, recipients, sign=self._sign, prepared=prepared)
        if envelope_id is not None:
            envelope = with_envelope_id(envelope, envelope_id)
        self._check_open()
        supervisor = self._supervisor or self._start()
        size = len(envelope.content)
        if not self._bytes.take(size):
            await self._room_for(size)
        try:
            # The supervisor's loop is the running one; asking it costs no getpid() syscall.
            job = Job(envelope, supervisor.get_loop().create_future(), time.monotonic(), envelope.recipients,
                      admit=admit)
            self._unfinished += 1  # before any await: a draining close() waits for it
            if self._unfinished == 1:
                self._drained.clear()
            if self._queue.full():
                await self._queue_when_room(job)
            else:
                self._queue.put_nowait(job)
            # Submitted before a draining close() it is still sent; not after a stop.
            if (reason := self._stopped or self._health.error) is not None:
                self._fail_waiting(reason)
            try:
                return await job.future
            except asyncio.CancelledError:
                if not job.taken and not job.future.done():
                    # Still queued: the worker that takes it will see the future cancelled.
                    job.future.cancel()
                raise
            except BaseException:
                # The error leaves with this frame in its traceback, and the job's future holds
                # the error: without the job, the frame, its envelope and the message are freed
                # as soon as the caller is done with the error, not by the cyclic collector.
                del job
                raise
        finally:
            self._bytes.release(size)

    def _prepared(self, envelope: Envelope, sender: str | None, recipients: list[str] | tuple[str, ...] | None
                  ) -> Envelope:
        """An envelope ``pool.prepare`` made ahead, checked: it is sent as it is."""
        if sender is not None or recipients is not None or self.dkim is not None:
            raise ValueError("an Envelope carries its own sender and recipients, and is sent unsigned: "
                             "sign the message before pool.prepare")
        return _checked(envelope)

    async def _room_for(self, size: int) -> None:
        """Wait until ``size`` more bytes fit under ``max_bytes_in_flight``. Waiting for
        room is part of being submitted: a draining close() waits for these too (else
        one that got its room after close() had returned would wait for ever on a
        stopped pool)."""
        self._admitting += 1
        self._drained.clear()
        try:
            await self._bytes.acquire(size)
        except BaseException:
            self._admitting -= 1
            self._settle_drained()
            raise
        self._admitting -= 1  # and submit counts it unfinished before its next await

    async def _queue_when_room(self, job: Job) -> None:
        try:
            await self._queue.put(job)
        except BaseException:
            self._job_done()  # cancelled while the queue was full: never queued, never sent
            raise

    def _check_open(self) -> None:
        if self._health.error is not None:
            raise _fresh(self._health.error)
        if self._closing:
            raise PoolClosedError("the pool is closed")

    def _requeue(self, job: Job) -> None:
        """Back in line without waiting for room (its room was given back when taken)."""
        self._queue.put_back(job)

    def _take(self) -> Job:
        job = self._queue.take()
        job.taken = True
        return job

    # -- workers --

    async def _worker(self, slot: Slot) -> None:
        """Take jobs one after another on this slot's session: read the oldest reply
        when it is due, else hold the next job, make the session ready for it, send it.

        With a pipelined session, the next job's envelope is written before the
        previous job's end-of-DATA reply is read (the slot's ``window``), when the queue
        already holds it: the two share one round trip. With BDAT (the relay offers
        CHUNKING), up to ``pipeline_depth`` whole transactions are on the wire at once,
        their replies read in order.
        """
        try:
            while True:
                if slot.window and self._reply_due(slot):
                    await self._complete(slot)
                elif (job := await self._next_to_send(slot)) is not None:
                    await self._send(slot, job)
        except BaseException as exc:
            # Stopped while idle (close: the supervisor QUITs the session), terminated, or
            # a bug: nothing on the wire may be left half done, and nobody may wait forever.
            self._strand(slot, exc)
            raise

    def _reply_due(self, slot: Slot) -> bool:
        """The oldest transaction's replies must be read before anything more is written:
        nothing else waits, the session is due for recycling, or the window is full."""
        conn = slot.connection
        return (not self._queue or self._must_recycle(conn)
                or len(slot.window) >= (self.pipeline_depth if conn.bdat else 2))

    async def _next_to_send(self, slot: Slot) -> Job | None:
        """Hold the next job, pace it, get a session for it, ask its ``admit()``. None
        when the slot holds no job to send after all: its caller cancelled it while
        queued, or it failed (pool stopped, relay refused, withdrawn) or went back to
        the queue (no session yet)."""
        job = self._take() if slot.window else await self._next_job(slot)
        if job.future.done():  # cancelled by its caller while queued
            self._job_done()
            return None
        slot.held = job
        if (self.rate.current != _UNLIMITED or self._shared_limiter is not None) and not await self._pace(slot):
            return None
        conn = slot.connection
        while slot.window and not conn.is_connected:
            # The server closed the session behind the messages on the wire: the
            # next one gets a new session instead of spending an attempt on this one.
            await self._complete(slot)
        if not slot.window and (wait := await self._ready(slot)) is not None:
            await asyncio.sleep(wait)  # the job is back in the queue, or failed
            return None
        # Asked last, right before the first byte goes out: connecting (TLS, AUTH, a
        # token fetch) and the rate limiter may have taken long enough for the
        # submitter to lose its claim on the message (a paused Redis worker).
        if job.admit is not None and (refusal := _admission(job.admit)) is not None:
            self._finish(slot.unhold(), stopped=refusal)
            return None
        return job

    async def _send(self, slot: Slot, job: Job) -> None:
        """Put the held job's transaction on the wire; route its outcome once known."""
        conn = slot.connection
        job.attempts += 1
        started = time.monotonic()
        conn.begin(started)
        transaction = Transaction(conn, job.envelope, job.pending)
        await transaction.start()
        if not transaction.open or not transaction.bdat:
            # DATA: its 354 came after every earlier reply; those are in now.
            while slot.window:
                await self._complete(slot)
        slot.held = None
        if transaction.open:
            slot.window.append((job, transaction, started))
        else:
            assert transaction.outcome is not None
            self._route(job, transaction.outcome, conn, started, slot.log)

    def _strand(self, slot: Slot, exc: BaseException) -> None:
        """The slot's worker stops: close a session left mid-transaction and end every
        job the slot holds with the reason."""
        if slot.connection.state is not ConnState.IDLE or slot.is_busy:
            slot.connection.close()
        stopped = self._stopped or (PoolClosedError("the pool was terminated")
                                    if isinstance(exc, asyncio.CancelledError)
                                    else PoolError(f"the pool stopped after an internal error: {exc!r}"))
        for job in slot.release():
            self._finish(job, stopped=stopped)

    async def _pace(self, slot: Slot) -> bool:
        """Wait for the rate limiters with nothing on the wire. False when the pool
        stopped meanwhile: the held job, taken but unsent, is failed and not sent after."""
        while slot.window:
            await self._complete(slot)
        paced = await self._unless_halted(self.rate.acquire())
        if paced and self._shared_limiter is not None:
            paced = await self._unless_halted(self._shared_limiter.acquire())
        if not paced or self._stopped is not None:
            self._finish(slot.unhold(), stopped=self._stopped or PoolClosedError("the pool closed"))
            return False
        return True

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

    async def _next_job(self, slot: Slot) -> Job:
        """The next queued job. An idle session is QUIT after ``idle_timeout``; while
        the relay is down, the first slot probes it every ``backoff_max`` seconds."""
        conn = slot.connection
        while True:
            if self._queue:
                return self._take()
            first = slot is self._slots[0]
            probing = first and self._health.is_down()
            wait = self.idle_timeout if conn.is_connected else None
            if probing or (wait is None and first):
                # The first slot never blocks for good: the relay may be declared down
                # while it waits, and then no job will come to wake it.
                wait = self.backoff_max if wait is None else min(wait, self.backoff_max)
            try:
                async with asyncio.timeout(wait):
                    job = await self._queue.get()
                    job.taken = True
                    return job
            except TimeoutError:
                if probing:
                    await self._probe(conn, slot.log)
                elif conn.is_connected and self.idle_timeout is not None and conn.idle_for() >= self.idle_timeout:
                    slot.log.info("smtp.idle_close", idle_for=round(conn.idle_for(), 3))
                    await conn.quit()

    def _must_recycle(self, conn: Connection) -> bool:
        limit = self.max_messages_per_connection
        return limit is not None and conn.transactions >= limit

    async def _ready(self, slot: Slot) -> float | None:
        """Make sure the slot holds a usable session for its job; None when it does.
        On a failed connect the job goes back to the queue without spending an attempt
        (or fails with the relay's error) and the seconds the slot must wait before
        trying again are returned."""
        conn = slot.connection
        if conn.is_connected and self._must_recycle(conn):
            slot.log.debug("smtp.recycle", transactions=conn.transactions)
            await conn.quit()
        if conn.is_connected:
            return None
        if (refusal := self._no_connect()) is None and self.metrics.connects == 0:
            # Until one session has opened, slots connect one at a time: a wrong
            # password costs one failed login, not one per slot (or per message).
            async with self._first_session:
                if (refusal := self._no_connect()) is None and self.metrics.connects == 0:
                    return await self._connect(slot)
        if refusal is not None:
            self._finish(slot.unhold(), stopped=refusal)
            return 0.0
        return await self._connect(slot)

    def _no_connect(self) -> PoolError | None:
        """Why no session may be opened now: the pool stopped, or the relay refused it
        for good (connecting again would only repeat a failed login)."""
        if self._stopped is not None:
            return _fresh(self._stopped)
        if self._health.error is not None and not self._health.error.transient:
            return _fresh(self._health.error)
        return None

    async def _connect(self, slot: Slot) -> float | None:
        """Open the slot's session for its job: None once open; else the job is failed
        (relay refused or down, pool stopped) or back in the queue, and the delay."""
        delay = await self._open(slot.connection, slot.log)
        if delay is None:
            return None
        job = slot.unhold()
        if self._health.error is not None:  # always so after a refused session
            self._finish(job, stopped=_fresh(self._health.error))
        elif self._stopped is not None:
            self._finish(job, stopped=self._stopped)
        else:
            self._requeue(job)
        return delay

    async def _open(self, conn: Connection, bound: EventLogger) -> float | None:
        """Open ``conn``'s session, counting and logging a failure: None once it is
        open, else how long before the next try (0 after a refused session)."""
        self.max_open = max(self.max_open, self.connections_open() + 1)
        try:
            await conn.connect()
        except ConnectionFailed as exc:
            self.metrics.connect_errors += 1
            # The first failure of an outage is news; the retries that follow are not.
            (bound.warning if self._health.failures == 0 else bound.debug)(
                "smtp.connect_error", error=exc.reason, relay=self._options.relay)
            return self._connect_failed(exc)
        except SessionRefused as exc:
            self.metrics.connect_errors += 1
            self._refused(exc, bound)
            return 0.0
        self._connected(conn, bound)
        return None

    async def _probe(self, conn: Connection, bound: EventLogger) -> None:
        try:
            await conn.connect()
        except ConnectionFailed as exc:
            self.metrics.connect_errors += 1
            bound.info("smtp.probe_failed", error=exc.reason, relay=self._options.relay)
        except SessionRefused as exc:
            self.metrics.connect_errors += 1
            self._refused(exc, bound)
        else:
            self._connected(conn, bound)

    def _connected(self, conn: Connection, bound: EventLogger) -> None:
        self.metrics.connects += 1
        if self._health.connected():
            bound.warning("smtp.relay_up", relay=self._options.relay)
        bound.info("smtp.connect", relay=self._options.relay, pipelining=conn.pipelined)

    def _connect_failed(self, exc: ConnectionFailed) -> float:
        """Count a failed connect; the relay is declared down after ``relay_down_timeout``
        without a session. Returns how long this slot waits before its next try."""
        now = time.monotonic()
        health = self._health
        delay, declared = health.connect_failed(now, exc.reason, code=exc.code, session_open=self._session_open())
        if declared is not None:
            log.error("smtp.relay_down", relay=self._options.relay,
                      down_for=round(now - (health.down_since or now), 1), error=exc.reason)
            self._fail_waiting(declared)
        return delay

    def _refused(self, exc: SessionRefused, bound: EventLogger) -> None:
        """A permanent session failure: stop connecting; fail everything waiting."""
        bound.error("smtp.session_refused", relay=self._options.relay, error=exc.reason, code=exc.code)
        self._fail_waiting(self._health.refused(exc.reason, code=exc.code))

    async def _complete(self, slot: Slot) -> None:
        """Read the oldest transaction's last replies and route its outcome. It leaves
        the window only then: cancelled while waiting, it is still there, stranded."""
        job, transaction, started = slot.window[0]
        outcome = await transaction.finish()
        slot.window.popleft()
        self._route(job, outcome, slot.connection, started, slot.log)

    # -- outcomes --

    def _route(self, job: Job, outcome: Outcome, conn: Connection, started: float, bound: EventLogger) -> None:
        """Fold one attempt's outcome into the job: finished, or retried after a backoff."""
        now = time.monotonic()
        conn.end(now)  # this transaction is off the wire
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
            self._finish(job, now=now)

    def _deferred(self, job: Job, deferred: Refusals, bound: EventLogger) -> None:
        """Retry the pending recipients after a backoff, or give up on them."""
        reason = self._stopped or self._health.error
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

    async def _requeue_after(self, job: Job, delay: float) -> None:
        await asyncio.sleep(delay)
        timer = asyncio.current_task()
        if timer is not None:
            self._timers.pop(timer, None)  # from here on this job is the queue's, not the timer's
        reason = self._stopped or self._health.error
        if reason is not None:
            self._finish(job, stopped=_fresh(reason))
        else:
            self._requeue(job)

    def _finish(self, job: Job, *, stopped: PoolError | None = None, now: float | None = None) -> None:
        """Resolve the caller's future with the job's outcome (exactly once).

        ``stopped``: why the pool will not try the pending recipients again; it is the
        error raised unless a recipient accepted (SendResult) or every recipient was
        refused for good (DeliveryError, permanent).
        """
        future = job.future
        if not future.done():
            for rcpt in job.pending:
                job.refused.setdefault(rcpt, job.deferred.get(rcpt, (job.last_code or 0, job.last_response)))
            elapsed = (time.monotonic() if now is None else now) - job.submitted
            if job.accepted:
                code, response = job.delivered or (250, "")
                # The job ends here: its list and dict go to the caller, not copies.
                future.set_result(SendResult(
                    message_id=job.envelope.message_id, accepted=job.accepted, refused=job.refused,
                    code=code, response=response, attempts=job.attempts, elapsed=elapsed,
                ))
                self.metrics.sent += 1
            else:
                permanent = bool(job.refused) and all(is_permanent(c) for c, _ in job.refused.values())
                if stopped is not None and not (permanent and job.attempts):
                    future.set_exception(_unsent(job, stopped))  # not sent, not failed: nothing to count
                else:
                    self.metrics.failed += 1
                    future.set_exception(_undelivered(job, permanent))
            self.metrics.observe_send(elapsed)
        self._job_done()

    def _job_done(self) -> None:
        self._unfinished -= 1
        if not self._unfinished:
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
        return RelayError(str(error), transient=error.transient, relay=error.relay, code=error.code,
                          refused=error.refused, recipients=error.recipients, maybe_delivered=error.maybe_delivered)
    return type(error)(*error.args)


def _unsent(job: Job, stopped: PoolError) -> PoolError:
    """The error a job the pool stopped trying ends with. A RelayError carries what a
    router needs to send the rest elsewhere, and only the rest."""
    if not isinstance(stopped, RelayError):
        return _fresh(stopped)
    refused = {r: c for r, c in job.refused.items() if is_permanent(c[0])}
    return RelayError(str(stopped), transient=stopped.transient, relay=stopped.relay, code=stopped.code,
                      refused=refused, recipients=tuple(r for r in job.envelope.recipients if r not in refused),
                      maybe_delivered=job.maybe_delivered)


def _undelivered(job: Job, permanent: bool) -> DeliveryError:
    """The error of a job delivered to no recipient."""
    return DeliveryError(
        f"not delivered: {job.last_code} {job.last_response}" if job.last_code
        else f"not delivered: {job.last_response}",
        code=job.last_code, response=job.last_response, permanent=permanent,
        attempts=job.attempts, refused=job.refused, message_id=job.envelope.message_id,
    )


def _slot(connection: Connection) -> Slot:
    return Slot(connection, log.bind(connection=connection.id))


def _check_options(*, size: int, max_attempts: int, queue_size: int, max_messages_per_connection: int | None,
                   relay_down_timeout: float, pipeline_depth: int, max_bytes_in_flight: int) -> None:
    """Raise ValueError naming the first option out of its range."""
    at_least_one = {"size": size, "max_attempts": max_attempts, "queue_size": queue_size,
                    "pipeline_depth": pipeline_depth, "max_bytes_in_flight": max_bytes_in_flight,
                    "max_messages_per_connection": 1 if max_messages_per_connection is None
                    else max_messages_per_connection}
    for name, value in at_least_one.items():
        if value < 1:
            raise ValueError(f"{name} must be at least 1")
    if relay_down_timeout <= 0:
        raise ValueError("relay_down_timeout must be positive")
