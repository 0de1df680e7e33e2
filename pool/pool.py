"""SMTPPool: a bounded queue feeding ``size`` workers, each owning one SMTP session.

    submit() -> queue -> worker -> Connection.start() ... Transaction.finish() -> SendResult | DeliveryError

A message is a ``_Job``. Its state (recipients still pending, accepted, refused,
attempts) changes only in the worker that holds it, or in ``_finish``. Transient
failures send the job through a backoff timer back into the queue, so a worker never
idles on a sleep while other messages wait.
"""

from __future__ import annotations

import asyncio
import random
import socket
import ssl
import time
from dataclasses import dataclass, field
from email.message import Message
from typing import TYPE_CHECKING, Any

import structlog
from aiosmtplib import SMTPResponseException

from pool.connection import Connection, ConnectionFailed, SessionOptions, Transaction, TransactionReply
from pool.envelope import Envelope, build_envelope
from pool.metrics import PoolMetrics
from pool.ratelimit import RateLimiter
from pool.results import DeliveryError, PoolClosedError, PoolError, Refusals, SendResult
from pool.retry import backoff_delay, is_permanent, is_positive

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = structlog.get_logger("pool")


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
    taken: bool = False


_STOP: Any = object()


class SMTPPool:
    """A pool of long-lived SMTP sessions. ``result = await pool.submit(message)``.

    See SPEC section 1 for every option. Use as ``async with SMTPPool(...) as pool``
    or call ``await pool.close()`` when done.
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
        registry: CollectorRegistry | None = None,
        local_hostname: str | None = None,
        ca_file: str | None = None,
        tls_context: ssl.SSLContext | None = None,
        relay_down_timeout: float = 300.0,
        dkim: Any = None,
    ) -> None:
        if size < 1:
            raise ValueError("size must be at least 1")
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        if max_messages_per_connection is not None and max_messages_per_connection < 1:
            raise ValueError("max_messages_per_connection must be at least 1")
        self.size = size
        self.max_messages_per_connection = max_messages_per_connection
        self.idle_timeout = idle_timeout
        self.max_attempts = max_attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
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
        )
        self.relay_down_timeout = relay_down_timeout
        self.dkim = dkim
        self._rate = RateLimiter(rate_limit) if rate_limit else None
        self._queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=queue_size)
        self._connections = [Connection(self._options) for _ in range(size)]
        self.max_open = 0  # most sessions ever open at once: for tests and stats
        self.metrics = PoolMetrics(
            registry, queue_depth=self.queue_depth, connections_open=self.connections_open
        )
        self._rng = random.Random()
        self._workers: list[asyncio.Task[None]] = []
        self._backoffs: set[asyncio.Task[None]] = set()
        self._unfinished = 0
        self._drained = asyncio.Event()
        self._drained.set()
        self._closing = False  # no new submissions
        self._abandon = False  # close(drain=False): fail what is not on the wire
        self._closed = False
        self._close_lock = asyncio.Lock()

    @classmethod
    def from_config(cls, settings: Any, **overrides: Any) -> SMTPPool:
        """Build a pool from a settings object with ``smtp``, ``pool`` and ``retry``
        sections (``dispatcher.config.Settings``; SPEC section 3)."""
        from pool.config import pool_kwargs

        if settings.smtp is None:
            raise ValueError("smtp: no relay configured")
        return cls(**{**pool_kwargs(settings.smtp, settings.pool, settings.retry), **overrides})

    # -- lifecycle --

    async def __aenter__(self) -> SMTPPool:
        self._start_workers()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        # A cancelled owner must not wait for the whole queue to drain.
        await self.close(drain=exc_type is not asyncio.CancelledError)

    @property
    def queue_size(self) -> int:
        return self._queue.maxsize

    def queue_depth(self) -> int:
        """Messages waiting for a session now."""
        return self._queue.qsize()

    def connections_open(self) -> int:
        """SMTP sessions open now (never more than ``size``)."""
        return sum(1 for conn in self._connections if conn.is_open)

    def _start_workers(self) -> None:
        if not self._workers and not self._closed:
            self._workers = [
                asyncio.create_task(self._worker(conn), name=f"smtp-pool-worker-{conn.id}")
                for conn in self._connections
            ]

    async def close(self, drain: bool = True) -> None:
        """Stop taking messages. ``drain=True`` sends everything already submitted;
        ``drain=False`` fails the waiting with PoolClosedError and finishes only the
        transactions on the wire. Then every session is ended with QUIT."""
        self._closing = True
        if not drain:
            self._abandon_waiting()
        async with self._close_lock:
            if self._closed:
                return
            if self._workers:
                await self._drained.wait()
                for _ in self._workers:
                    await self._queue.put(_STOP)
                await asyncio.gather(*self._workers)
            self._closed = True
            self._abandon_waiting()

    def terminate(self) -> None:
        """Drop every session at once, without QUIT (a second Ctrl-C). Messages queued or
        on the wire fail with PoolClosedError: the server may or may not have them."""
        self._closing = True
        self._abandon_waiting()
        for conn in self._connections:
            conn.close()
        for worker in self._workers:
            worker.cancel()

    def _abandon_waiting(self) -> None:
        """Fail every job not on the wire: queued ones and those backing off."""
        self._abandon = True
        for task in list(self._backoffs):
            task.cancel()
        while not self._queue.empty():
            job = self._queue.get_nowait()
            if job is not _STOP:
                self._finish(job, closed=True)

    # -- submit --

    async def submit(
        self,
        message: Message | bytes | str,
        *,
        sender: str | None = None,
        recipients: list[str] | tuple[str, ...] | None = None,
    ) -> SendResult:
        """Send one message. Returns a SendResult when at least one recipient accepted.

        Raises DeliveryError when none did, PoolClosedError when the pool is closed,
        ValueError at once for bad input. Waits while the queue is full.
        """
        envelope = build_envelope(message, sender, recipients)
        if self._closing:
            raise PoolClosedError("the pool is closed")
        self._start_workers()
        loop = asyncio.get_running_loop()
        job = _Job(envelope, loop.create_future(), time.monotonic(), envelope.recipients)
        self._unfinished += 1
        self._drained.clear()
        try:
            await self._queue.put(job)
        except BaseException:
            # Cancelled while the queue was full: never queued, never sent.
            self._job_done()
            raise
        if self._closed:
            self._abandon_waiting()
        try:
            return await job.future
        except asyncio.CancelledError:
            if not job.taken and not job.future.done():
                # Still queued: the worker that takes it will see the future cancelled.
                job.future.cancel()
            raise

    # -- workers --

    async def _worker(self, conn: Connection) -> None:
        """Take jobs one after another on this worker's session.

        With a pipelined session, the next job's envelope is written before the
        previous job's end-of-DATA reply is read (``inflight``), when the queue already
        holds it: the two share one round trip.
        """
        bound = log.bind(connection=conn.id)
        job: _Job | None = None
        inflight: tuple[_Job, Transaction] | None = None
        try:
            while True:
                if inflight is not None and (self._queue.empty() or self._must_recycle(conn)):
                    await self._complete(*inflight, conn, bound)
                    inflight = None
                job = self._queue.get_nowait() if inflight is not None else await self._next_job(conn)
                if job is _STOP:
                    break
                if job.future.done():  # cancelled by its caller while queued
                    self._job_done()
                elif self._abandon:
                    self._finish(job, closed=True)
                else:
                    job.taken = True
                    job.attempts += 1
                    if self._rate is not None:
                        delay = self._rate.reserve()
                        if delay > 0:
                            if inflight is not None:
                                await self._complete(*inflight, conn, bound)
                                inflight = None
                            await asyncio.sleep(delay)
                    transaction = await self._start(job, conn, bound, reuse=inflight is not None)
                    if inflight is not None:
                        await self._complete(*inflight, conn, bound)
                    inflight = (job, transaction) if transaction is not None else None
                job = None
            if inflight is not None:
                await self._complete(*inflight, conn, bound)
                inflight = None
        except asyncio.CancelledError:
            # Only when the loop itself is torn down: nobody may wait forever.
            conn.close()
            for stranded in (job, inflight[0] if inflight else None):
                if stranded is not None and stranded is not _STOP:
                    self._finish(stranded, closed=True)
            raise
        await conn.quit()

    async def _next_job(self, conn: Connection) -> _Job:
        """The next queued job; an idle session is QUIT after ``idle_timeout``."""
        if conn.is_connected and self.idle_timeout is not None:
            try:
                async with asyncio.timeout(self.idle_timeout):
                    return await self._queue.get()
            except TimeoutError:
                log.info("smtp.idle_close", connection=conn.id, idle_for=round(conn.idle_for(), 3))
                await conn.quit()
        return await self._queue.get()

    def _must_recycle(self, conn: Connection) -> bool:
        limit = self.max_messages_per_connection
        return limit is not None and conn.transactions >= limit

    async def _start(self, job: _Job, conn: Connection, bound: Any, *, reuse: bool) -> Transaction | None:
        """Begin one attempt of ``job``. Returns the transaction when its end-of-DATA
        reply is still to be read; None when the attempt has already been applied."""
        try:
            if not reuse:
                if conn.is_connected and self._must_recycle(conn):
                    bound.debug("smtp.recycle", transactions=conn.transactions)
                    await conn.quit()
                if not conn.is_connected:
                    conn.close()  # a session the server closed between transactions
                    await self._connect(conn, bound)
            transaction = await conn.start(job.envelope, job.pending)
        except ConnectionFailed as exc:
            self._lost(job, conn, exc, bound)
            return None
        except SMTPResponseException as exc:
            # A permanent refusal while opening the session (for example 535 on AUTH).
            conn.close()
            job.last_code, job.last_response = exc.code, exc.message
            for rcpt in job.pending:
                job.refused[rcpt] = (exc.code, exc.message)
            job.pending = ()
            self._finish(job)
            return None
        except Exception as exc:
            self._broken(job, conn, exc, bound)
            return None
        if transaction.open:
            return transaction
        self._apply(job, transaction.reply, bound)
        return None

    async def _complete(self, job: _Job, transaction: Transaction, conn: Connection, bound: Any) -> None:
        """Read the end-of-DATA reply of an open transaction and apply the outcome."""
        try:
            reply = await transaction.finish()
        except ConnectionFailed as exc:
            self._lost(job, conn, exc, bound)
            return
        except Exception as exc:
            self._broken(job, conn, exc, bound)
            return
        self._apply(job, reply, bound)

    def _broken(self, job: _Job, conn: Connection, exc: Exception, bound: Any) -> None:
        """Not a server reply (say, a non-ASCII address to a server without SMTPUTF8,
        or a bug): the session state is unknown, so it goes; the message fails."""
        conn.close()
        bound.error("smtp.error", message_id=job.envelope.message_id, attempt=job.attempts, exc_info=exc)
        job.last_code, job.last_response = None, f"{type(exc).__name__}: {exc}"
        for rcpt in job.pending:
            job.refused.setdefault(rcpt, (0, job.last_response))
        job.pending = ()
        self._finish(job)

    def _lost(self, job: _Job, conn: Connection, exc: ConnectionFailed, bound: Any) -> None:
        conn.close()
        if exc.ambiguous:
            self.metrics.ambiguous += 1
            bound.warning(
                "smtp.ambiguous", message_id=job.envelope.message_id, attempt=job.attempts, reason=exc.reason
            )
        job.last_code, job.last_response = exc.code, exc.reason
        self._deferred(job, {}, bound)

    async def _connect(self, conn: Connection, bound: Any) -> None:
        self.max_open = max(self.max_open, self.connections_open() + 1)
        try:
            await conn.connect()
        except BaseException as exc:
            self.metrics.connect_errors += 1
            bound.warning("smtp.connect_error", error=str(exc), host=self._options.hostname, port=self._options.port)
            raise
        self.metrics.connects += 1
        bound.info(
            "smtp.connect", host=self._options.hostname, port=self._options.port, pipelining=conn.pipelined
        )

    def _apply(self, job: _Job, reply: TransactionReply, bound: Any) -> None:
        """Fold one transaction's replies into the job: accepted, refused, deferred."""
        deferred: Refusals = {}
        mail_code, mail_text = reply.mail
        if not is_positive(mail_code):
            job.last_code, job.last_response = mail_code, mail_text
            target = job.refused if is_permanent(mail_code) else deferred
            for rcpt in job.pending:
                target[rcpt] = reply.mail
        else:
            candidates: list[str] = []
            for rcpt, rcpt_reply in zip(job.pending, reply.rcpt):
                if is_positive(rcpt_reply[0]):
                    candidates.append(rcpt)
                elif is_permanent(rcpt_reply[0]):
                    job.refused[rcpt] = rcpt_reply
                else:
                    deferred[rcpt] = rcpt_reply
            if candidates:
                assert reply.data is not None
                job.last_code, job.last_response = reply.data
                if is_positive(reply.data[0]):
                    job.accepted.extend(candidates)
                    job.delivered = reply.data
                else:
                    target = job.refused if is_permanent(reply.data[0]) else deferred
                    for rcpt in candidates:
                        target[rcpt] = reply.data
            elif reply.rcpt:
                job.last_code, job.last_response = reply.rcpt[-1]
        job.pending = tuple(deferred)
        if deferred:
            self._deferred(job, deferred, bound)
        else:
            self._finish(job)

    def _deferred(self, job: _Job, deferred: Refusals, bound: Any) -> None:
        """Retry the pending recipients after a backoff, or give up on them."""
        if job.attempts >= self.max_attempts or job.future.done() or self._abandon:
            for rcpt in job.pending:
                job.refused[rcpt] = deferred.get(rcpt, (job.last_code or 0, job.last_response))
            if job.attempts >= self.max_attempts:
                bound.warning(
                    "smtp.give_up", message_id=job.envelope.message_id, attempts=job.attempts,
                    code=job.last_code, response=job.last_response,
                )
            self._finish(job, closed=self._abandon and not job.accepted)
            return
        delay = backoff_delay(job.attempts, self.backoff_base, self.backoff_max, self._rng)
        self.metrics.retries += 1
        bound.info(
            "smtp.retry", message_id=job.envelope.message_id, attempt=job.attempts,
            delay=round(delay, 3), code=job.last_code, response=job.last_response,
            recipients=len(job.pending),
        )
        task = asyncio.create_task(self._requeue_after(job, delay))
        self._backoffs.add(task)
        task.add_done_callback(self._backoffs.discard)

    async def _requeue_after(self, job: _Job, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
            await self._queue.put(job)
        except asyncio.CancelledError:
            # close(drain=False) while backing off: nothing is on the wire for this job.
            for rcpt in job.pending:
                job.refused.setdefault(rcpt, (job.last_code or 0, job.last_response))
            self._finish(job, closed=not job.accepted)
            raise

    def _finish(self, job: _Job, *, closed: bool = False) -> None:
        """Resolve the caller's future with the job's outcome (exactly once)."""
        if not job.future.done():
            elapsed = time.monotonic() - job.submitted
            if job.accepted:
                code, response = job.delivered or (250, "")
                job.future.set_result(
                    SendResult(
                        message_id=job.envelope.message_id,
                        accepted=list(job.accepted),
                        refused=dict(job.refused),
                        code=code,
                        response=response,
                        attempts=job.attempts,
                        elapsed=elapsed,
                    )
                )
                self.metrics.sent += 1
            else:
                permanent = bool(job.refused) and all(is_permanent(c) for c, _ in job.refused.values())
                error: PoolError
                if closed and not permanent:
                    error = PoolClosedError(
                        "the pool closed before this message was sent" if job.attempts == 0
                        else "the pool closed before this message could be retried"
                    )
                else:
                    error = DeliveryError(
                        f"not delivered: {job.last_code} {job.last_response}",
                        code=job.last_code,
                        response=job.last_response,
                        permanent=permanent,
                        attempts=job.attempts,
                        refused=job.refused,
                        message_id=job.envelope.message_id,
                    )
                job.future.set_exception(error)
                self.metrics.failed += 1
            self.metrics.observe_send(elapsed)
        self._job_done()

    def _job_done(self) -> None:
        self._unfinished -= 1
        if self._unfinished == 0:
            self._drained.set()
