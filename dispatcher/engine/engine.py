"""The delivery engine: ``Engine(source, ledger, composer, sender).run() -> Tally``.

    source batches -> ledger.admit -> compose -> suppression -> sender.submit -> ledger.settle

One reader task takes the source's jobs in order, asks the ledger about each (resume,
duplicates), composes it (here, or in a thread when it reads files or signs) and
hands each job to send to a sender task, at most ``limit`` jobs at a time and within
``max_bytes`` of messages: the pool's queue is the backpressure, and memory depends on
it, not on the number of jobs. The senders are a set of tasks started as they are
needed (never more than ``limit``) that each take one job at a time from the reader,
in order: no task per job. A sender awaits ``sender.submit`` and settles the job with
one ``Outcome``. The engine counts every settled job in its ``Tally`` (progress
and metrics read it).

What it promises, whatever stops it (the source or the ledger raising ``Halt``, the
relay refusing the session, a signal, a bug in a sender):

- Every job the source hands out is settled exactly once, or not at all when the
  engine stopped before it was judged: a job is never half-recorded.
- A job goes to the sender once per run; one that is not known to have been on the
  wire (stopping, the pool closed, the relay down) settles ``unsent``: the file
  ledger writes no row (the next run sends it), the stream ledger hands it back.
- Every submit that returns is settled (sent or failed); when the ledger cannot
  record it (``Halt``), the engine stops and the ledger keeps what went unrecorded.
- Stopping (``halt``) cancels the reader, closes the pool without draining (queued
  messages fail with PoolClosedError, those on the wire finish and are recorded);
  ``abort`` (a second signal) drops every session at once. No error path waits for
  anything else: a sender that raises halts the engine instead of hanging it.
- Every task has an owner: the reader and the senders are in one TaskGroup, the
  progress and suppression-watch tasks are cancelled and awaited before ``run``
  returns. ``CancelledError`` is never caught: only ``Exception``.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Awaitable, Callable, Iterable
from contextlib import aclosing
from typing import Any

import structlog

from dispatcher.compose.jobs import JobError, Outgoing
from dispatcher.compose.stage import Composer
from dispatcher.compose.templates import SETTINGS_FIELDS
from dispatcher.engine.outcome import NOT_SENT, NOTHING_TO_RETRY, SKIPPED, UNSENT, Outcome
from dispatcher.engine.ports import Delivery, Halt, Ledger, Source, Verdict
from dispatcher.engine.tally import Tally
from dispatcher.exit import ExitCode
from dispatcher.loop.suppression import Admission
from dispatcher.loop.verp import envelope_id_for
from dispatcher.observe.progress import LiveDisplay, Speed, progress_fields
from dispatcher.relays import Sender
from pool import DeliveryError, PoolClosedError, RelayError, Withdrawn
from pool.budget import ByteBudget
from pool.envelope import for_recipients
from pool.results import SendResult

log = structlog.get_logger("dispatcher")

LOG_PROGRESS_EVERY = 10.0
TTY_PROGRESS_EVERY = 0.25
COMPOSE_AHEAD = 4  # jobs composed by their senders at once (each holds its message until it fits the budget)


class Engine:
    def __init__(
        self,
        source: Source,
        ledger: Ledger,
        composer: Composer,
        sender: Sender,
        *,
        admission: Admission,
        tally: Tally,
        say: Callable[[str], None],
        max_bytes: int,
        limit: int | None = None,
        progress: bool | None = False,
        announce: Iterable[tuple[str, dict[str, Any]]] = (),
        stop: asyncio.Event | None = None,
        connect_first: bool = True,
        config_stop: Callable[[JobError, int], str] = lambda error, line: (
            f"{error}; the run stopped at line {line} (nothing recorded from it on): fix the configuration and "
            "run the same command"),
    ) -> None:
        """``limit``: jobs in flight (default: what the pool holds, its sessions and its
        queue); ``max_bytes``: their message bytes; ``say``: one line
        for the user (why the engine stopped); ``progress``: a live display (True), log
        lines (None: a display when stderr is a terminal) or nothing (False);
        ``announce``: log lines written once the display is up; ``stop``: an event
        that stops the engine when set (by the source's side too); ``config_stop``:
        what is said when a job shows the configuration wrong (every job would fail
        alike), given the error and the job's line; ``connect_first``: open a session
        before the first job is read (a relay refusing it stops the engine first)."""
        self.source = source
        self.ledger = ledger
        self.composer = composer
        self.sender = sender
        self.admission = admission
        self.tally = tally
        self.say = say
        self.progress = progress
        self.announce = list(announce)
        self.config_stop = config_stop
        self.connect_first = connect_first
        self.stop_code: int | None = None  # why the engine stopped early, as an exit status
        self.relay_error: RelayError | None = None  # the relay's refusal or outage that stopped it, if one did
        self._stop = stop if stop is not None else asyncio.Event()
        limit = limit if limit is not None else sender.size + sender.queue_size
        self._room = asyncio.Semaphore(limit)  # jobs handed to the senders and not finished
        # The sender tasks and the jobs waiting for one (None: no more jobs, the task ends).
        self._senders: list[asyncio.Task[None]] = []
        self._max_senders = limit
        self._waiting_senders = 0
        self._handed: asyncio.Queue[Delivery | None] = asyncio.Queue()
        self._reading = True
        # Messages in flight are bounded by bytes too: 1,000 queued 10 MB messages would
        # need 10 GB. Jobs composed by their sender (attachment files, DKIM) compose a
        # few at a time, each holding its place until its bytes fit.
        self._bytes = ByteBudget(max_bytes)
        self._compose_ahead = asyncio.Semaphore(COMPOSE_AHEAD)

    # -- control --

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def halt(self, code: int, message: str | None = None) -> None:
        """Stop early (the first reason gives the exit status); ``message`` is said."""
        if message is not None:
            self.say(message)
        if not self._stop.is_set():
            self.stop_code = code
            self._stop.set()

    def _relay_down(self, exc: RelayError) -> None:
        if self.relay_error is None:
            self.relay_error = exc
        self.halt(ExitCode.RELAY_DOWN if exc.transient else ExitCode.USAGE, str(exc))

    def abort(self) -> None:
        """Drop every session now (a second signal): what was on the wire is not settled."""
        self.sender.terminate()

    async def run(self) -> Tally:
        progress = asyncio.create_task(self._progress())
        watch = asyncio.create_task(self.admission.watch())  # the suppression list, changed by others
        try:  # from here on, whatever ends run() (a cancel at the first await too) ends both tasks
            await asyncio.sleep(0)  # the live display is up: these lines go above it, wrapped to the terminal
            for event, fields in self.announce:
                log.info(event, **fields)
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read(group))
                stopped = group.create_task(self._stop.wait())
                await asyncio.wait({reader, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not self._stop.is_set():  # every job read: wait for the last results
                    self._no_more_jobs()
                    if self._senders:
                        idle = group.create_task(asyncio.wait(self._senders))
                        await asyncio.wait({idle, stopped}, return_when=asyncio.FIRST_COMPLETED)
                        idle.cancel()
                stopped.cancel()
                if self._stop.is_set():
                    reader.cancel()  # it hands out no job from here on
                    self._no_more_jobs()  # the senders settle those handed out (unsent) and end
                    # Queued messages fail with PoolClosedError (not recorded); those on
                    # the wire finish and are recorded. A second signal terminates.
                    await self.sender.close(drain=False)
            await self.sender.close()  # every result is in: QUIT the sessions
        finally:
            progress.cancel()
            watch.cancel()
            await asyncio.gather(progress, watch, return_exceptions=True)
        return self.tally

    # -- reading and admitting --

    async def _read(self, group: asyncio.TaskGroup) -> None:
        try:
            # A session first: a wrong password, an untrusted certificate or a relay that
            # is down ends the run before any job is read or recorded.
            if self.connect_first:
                await self.sender.connect()
            async with aclosing(self.source.batches()) as batches:
                async for batch in batches:
                    pending = iter(batch)
                    try:
                        for delivery in pending:
                            await self._launch(group, self._admit(delivery))
                    finally:
                        for rest in pending:  # stopped (cancelled) in the middle of a batch
                            self._settle(rest, NOT_SENT)
        except Halt as exc:
            self.halt(exc.code, exc.message)
        except RelayError as exc:
            self._relay_down(exc)
        except Exception as exc:  # a bug: stop, never hang
            log.exception("run.reader_failed")
            self.halt(ExitCode.USAGE, f"internal error while reading jobs: {type(exc).__name__}: {exc}")

    def _admit(self, delivery: Delivery) -> Delivery | None:
        """The ledger's verdict; a job to send comes back composed, unless its sender
        composes it off the event loop (attachment files, DKIM)."""
        verdict = self.ledger.admit(delivery)
        if verdict is Verdict.SKIP:
            self._settle(delivery, SKIPPED)
            return None
        if verdict is Verdict.DUPLICATE or verdict is Verdict.INVALID or delivery.error is not None:
            self._invalid(delivery)
            return None
        delivery.retry = verdict is Verdict.RETRY
        if delivery.outgoing is None:
            assert delivery.job is not None
            if self.composer.off_loop(delivery.job):
                return delivery
            try:
                delivery.outgoing = self.composer.finish(delivery.job)
            except JobError as exc:
                delivery.error = exc
                self._invalid(delivery)
                return None
        return delivery

    async def _launch(self, group: asyncio.TaskGroup, delivery: Delivery | None) -> None:
        """One sender for a job to send, once the pool has room for it."""
        self.tally.jobs_read += 1
        if delivery is not None and not self._reading:  # stopped, and the senders told there are no more
            self._settle(delivery, NOT_SENT)  # (a reader that went on after its cancel: not handed out)
            delivery = None
        if delivery is not None:
            try:
                await self._room.acquire()
            except BaseException:
                self._settle(delivery, NOT_SENT)
                raise
            if delivery.outgoing is not None:  # composed already: its bytes are known
                delivery.held = _message_bytes(delivery.outgoing)
                if not self._bytes.take(delivery.held):  # the usual case: no coroutine
                    try:
                        await self._bytes.acquire(delivery.held)
                    except BaseException:
                        self._room.release()
                        self._settle(delivery, NOT_SENT)
                        raise
            self._handed.put_nowait(delivery)
            if self._handed.qsize() > self._waiting_senders and len(self._senders) < self._max_senders:
                self._senders.append(group.create_task(self._sender()))
        if self.tally.jobs_read % 64 == 0:
            await asyncio.sleep(0)  # let senders, results, signals and progress through

    def _invalid(self, delivery: Delivery) -> None:
        error = delivery.error
        assert error is not None
        number = delivery.line
        if self._stop.is_set() or error.field in SETTINGS_FIELDS:
            # Not recorded: the engine stopped before this job, the next run judges it.
            # A settings field: every job would fail alike: stop, record nothing more.
            self._settle(delivery, NOT_SENT)
            if error.field in SETTINGS_FIELDS:
                self.halt(ExitCode.USAGE, self.config_stop(error, number))
            return
        log.warning("job.invalid", line=number, id=delivery.job_id, field=error.field, error=str(error))
        self._settle(delivery, Outcome("invalid", {"error": f"line {number}: {error}"}))

    def _settle(self, delivery: Delivery, outcome: Outcome) -> None:
        delivery.settled = True
        self.ledger.settle(delivery, outcome)
        if outcome.status != UNSENT:
            self.tally.counts[outcome.status] += 1
            self.tally.bytes_done += delivery.size

    # -- sending --

    def _no_more_jobs(self) -> None:
        """The reader is done (or cancelled): each sender ends once the jobs handed out are."""
        if self._reading:
            self._reading = False
            for _ in self._senders:
                self._handed.put_nowait(None)

    async def _sender(self) -> None:
        """Takes the reader's jobs one at a time, in order, until there are no more."""
        handed = self._handed
        while True:
            if handed.empty():
                self._waiting_senders += 1
                try:
                    delivery = await handed.get()
                finally:
                    self._waiting_senders -= 1
            else:
                delivery = handed.get_nowait()
            if delivery is None:
                return
            try:
                await self._deliver(delivery)
            except Halt as exc:
                self.halt(exc.code, exc.message)
            except Exception as exc:  # a bug: stop, never hang
                log.exception("run.sender_failed", line=delivery.line, id=delivery.job_id)
                self.halt(ExitCode.USAGE, f"internal error on line {delivery.line}: {type(exc).__name__}: {exc}")
                if not delivery.settled:
                    self._settle(delivery, NOT_SENT)
            finally:
                self._bytes.release(delivery.held)
                self._room.release()

    async def _deliver(self, delivery: Delivery) -> None:
        outgoing = delivery.outgoing
        if outgoing is None:
            outgoing = await self._compose(delivery)
            if outgoing is None:
                return
        recipients = outgoing.recipients
        if delivery.retry:
            recipients = self.ledger.to_retry(delivery, recipients)
            if not recipients:
                self._settle(delivery, NOTHING_TO_RETRY)
                return
        asked = recipients
        recipients, suppressed = self.admission.admit(recipients)
        if not recipients:  # every recipient is on the suppression list: nothing to send
            # On --retry-failed the row is about the recipients retried, not the whole
            # job: an earlier delivery to the others stays on record.
            self._settle(delivery, Outcome("suppressed", {"suppressed": suppressed,
                                                          "recipients": list(asked) if delivery.retry else None}))
            return
        if self._stop.is_set():
            self._settle(delivery, NOT_SENT)  # the next run sends it
            return
        await self._submit(delivery, outgoing, recipients, suppressed)

    async def _compose(self, delivery: Delivery) -> Outgoing | None:
        """Compose in a thread (attachment files are read and RSA runs there, never on
        the event loop), a few at a time; None when the job is invalid."""
        assert delivery.job is not None
        async with self._compose_ahead:
            try:
                outgoing = await asyncio.to_thread(self.composer.finish, delivery.job)
            except JobError as exc:
                delivery.error = exc
                self._invalid(delivery)
                return None
            held = _message_bytes(outgoing)
            await self._bytes.acquire(held)
            delivery.held = held
        return outgoing

    async def _submit(self, delivery: Delivery, outgoing: Outgoing, recipients: list[str],
                      suppressed: list[str]) -> None:
        started = time.monotonic()
        retried = recipients if delivery.retry else None
        try:
            if delivery.lease is None:
                result: SendResult | None = await self._submission(delivery, outgoing, recipients)
            else:
                result = await self._leased(delivery, outgoing, recipients)
        except DeliveryError as exc:
            self._settle(delivery, Outcome("failed", {
                "attempts": exc.attempts, "code": exc.code, "response": exc.response, "refused": exc.refused,
                "error": str(exc), "elapsed_ms": _ms(started), "recipients": retried, "suppressed": suppressed,
                "message_id": exc.message_id,
                "relay": getattr(exc, "relay", None),  # set by SMTPRouter once DeliveryError carries it
            }, transient=not exc.permanent))
            await self.admission.refused(delivery.job_id or "", exc.refused)
        except RelayError as exc:
            # Not the message's fault: not recorded, so the next run sends it.
            self._settle(delivery, NOT_SENT)
            self._relay_down(exc)
        except PoolClosedError:
            self._settle(delivery, NOT_SENT)  # never sent (or not known to be): a re-run sends it
        except ValueError as exc:
            delivery.error = JobError("", str(exc))
            self._invalid(delivery)
        else:
            if result is None:
                return  # withdrawn: the ledger settled it
            self._settle(delivery, Outcome("sent", {
                "attempts": result.attempts, "code": result.code, "response": result.response,
                "refused": result.refused, "suppressed": suppressed,
                "elapsed_ms": round(result.elapsed * 1000, 1), "recipients": retried, "relay": result.relay,
                "message_id": result.message_id,
            }))
            await self.admission.refused(delivery.job_id or "", result.refused, delivered=True)

    def _submission(self, delivery: Delivery, outgoing: Outgoing, recipients: list[str]) -> Awaitable[SendResult]:
        """``sender.submit`` for the delivery (a plain call: no coroutine of its own
        per job); with a lease, asked right before the message goes on the wire."""
        if outgoing.envelope is not None:  # prepared by the compose process, its ENVID included
            envelope = outgoing.envelope
            if len(recipients) != len(envelope.recipients):
                envelope = for_recipients(envelope, recipients)
            return self.sender.submit(envelope, admit=delivery.lease)
        return self.sender.submit(outgoing.message, sender=outgoing.sender, recipients=recipients,
                                  prepared=outgoing.prepared, envelope_id=envelope_id_for(delivery.job_id or ""),
                                  admit=delivery.lease)

    async def _leased(self, delivery: Delivery, outgoing: Outgoing, recipients: list[str]) -> SendResult | None:
        """A lapsed lease is confirmed by the ledger before the message goes on the
        wire (None: it was not; the ledger settled or dropped the job)."""
        while True:
            try:
                return await self._submission(delivery, outgoing, recipients)
            except Withdrawn:
                if not await self.ledger.confirm(delivery):
                    return None

    # -- progress --

    async def _progress(self) -> None:
        """The live display on a terminal (``progress`` True forces it), else a
        ``run.progress`` log line every ``LOG_PROGRESS_EVERY`` seconds. Started before
        the reader, so that every log line of the run is printed above the display."""
        if self.progress is False:
            return
        if self.progress or sys.stderr.isatty():
            with LiveDisplay(self.tally, force=bool(self.progress)) as display:
                while True:
                    await asyncio.sleep(TTY_PROGRESS_EVERY)
                    display.refresh()
        # The rate of the last few periods, not since the start: a relay that died a
        # minute ago shows as 0/s, not as a slowly sinking average.
        speed = Speed(window=3 * LOG_PROGRESS_EVERY)
        while True:
            await asyncio.sleep(LOG_PROGRESS_EVERY)
            log.info("run.progress", **self.tally.counts, **progress_fields(self.tally, speed),
                     queue_depth=self.sender.queue_depth())


def _message_bytes(outgoing: Outgoing) -> int:
    return len(outgoing.envelope.content) if outgoing.envelope is not None else len(outgoing.message)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
