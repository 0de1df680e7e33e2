"""``dispatcher run``: jobs file -> pool -> results file, with signals, progress, metrics.

One reader task streams the jobs (read in a thread, never on the event loop), admits
each line (validate, dedupe, skip what an earlier run finished) and starts one sender
task per valid job, at most ``size + queue_size`` at a time: the pool's queue is the
backpressure, and memory depends on it, not on the file's length. A sender awaits
``pool.submit`` and records the outcome. Every task belongs to one TaskGroup; the run
ends when the reader and every sender have ended.

Whatever stops the run early (a signal, a results file that cannot be written, the
relay refusing the session, a bug) stops it the same way: the reader is cancelled,
``pool.close(drain=False)`` fails what is still queued (not sent, not recorded: the
next run sends it) while the transactions on the wire finish and are recorded. A
second signal ``terminate()``s the pool.
"""

from __future__ import annotations

import asyncio
import os
import queue
import select
import signal
import stat
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from dispatcher.batch.journal import Claim, Journal, JournalBusy, TempFileError
from dispatcher.compose.jobs import JobError, Line, LineSplitter, Outgoing
from dispatcher.compose.process import ComposeProcess, ComposeProcessError
from dispatcher.compose.process import usable as compose_process_usable
from dispatcher.compose.stage import AnyJob, Composer, Done, Invalid, Ready
from dispatcher.compose.templates import SETTINGS_FIELDS, TemplatesSettings
from dispatcher.config import Settings
from dispatcher.engine.outcome import result_row
from dispatcher.exit import ExitCode
from dispatcher.loop.suppression import Admission, StoreError, open_store
from dispatcher.loop.verp import envelope_id_for
from dispatcher.observe.metrics import MetricsError, RunMetrics, write_textfile
from dispatcher.observe.metrics import serve as serve_metrics
from dispatcher.observe.progress import LiveDisplay, Speed, progress_fields
from dispatcher.relays import Sender
from dispatcher.sender import Sending, build_sender
from dispatcher.signals import signal_handlers
from dispatcher.sink import DEFAULT_MAILDIR
from pool import DeliveryError, PoolClosedError, RelayError
from pool.budget import ByteBudget
from pool.envelope import for_recipients

log = structlog.get_logger("dispatcher")

STATUSES = ("sent", "failed", "invalid", "suppressed", "skipped")
LOG_PROGRESS_EVERY = 10.0
TTY_PROGRESS_EVERY = 0.25
READ_CHUNK = 1 << 18  # a chunk's lines are split at once: keep it small
COMPOSE_AHEAD = 4  # jobs composed by their senders at once (each holds its message until it fits the budget)


class RunError(Exception):
    """The run cannot start (jobs or results file, attachments root): one line for the user."""


@dataclass
class RunOptions:
    jobs: str
    results: Path
    progress: bool | None = None  # None: a bar when stderr is a terminal
    maildir: Path = DEFAULT_MAILDIR
    attachments_root: Path | None = None  # None: config jobs.attachments_root, else the jobs file's directory
    retry_failed: bool = False  # send again the recipients an earlier run left with a transient failure
    compose_process: bool | None = None  # None: a second process composes when the jobs are a file and 2+ cores


@dataclass(slots=True)
class _Item:
    """A valid job on its way to the pool."""

    line: int
    job_id: str
    size: int  # bytes of its line, for the progress bar
    outgoing: Outgoing | None  # None: composed by the sender, off the event loop (attachment files, DKIM)
    job: AnyJob | None = None
    retry: bool = False  # --retry-failed: done by an earlier run; only its transient recipients
    held: int = 0  # message bytes it holds of the run's budget (pool.max_bytes_in_flight)


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    started: float = field(default_factory=time.monotonic)
    bytes_done: int = 0  # of lines whose job has ended: what the bar shows
    bytes_total: int | None = None  # the jobs file's size, when it is a regular file
    jobs_read: int = 0  # lines read, whatever became of them (blank ones too: they are lines of the file)
    blank: int = 0  # blank lines: read, and neither a job nor a result
    finished: float | None = None  # time.time() at the end of the run, for the metrics textfile
    bytes_read: int = 0  # of the jobs file, read so far
    unsent_before: int = 0  # skipped lines whose earlier result was failed or invalid

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        done = self.counts["sent"] + self.counts["failed"]
        return done / elapsed if elapsed > 0 else 0.0


class _ResultsUnwritable(Exception):
    pass


class Run:
    def __init__(self, options: RunOptions, settings: Settings) -> None:
        self.options = options
        self.settings = settings
        self.registry = CollectorRegistry()
        self.tally = Tally()
        RunMetrics(self.tally, self.registry)  # dispatcher_*, read from the tally when scraped
        self.journal = Journal(options.results, retry_failed=options.retry_failed)
        self.pool: Sender | None = None  # an SMTPPool, or a RelayRouter under relays:
        self.signalled = False
        self._stop = asyncio.Event()
        self._stop_code: int | None = None  # why the run stopped early, as an exit status
        self._idle = asyncio.Event()  # no sender task running
        self._idle.set()
        self._senders = 0
        self._room = asyncio.Semaphore(1)  # replaced once the pool's size is known
        # Messages in flight are bounded by bytes too: 1,000 queued 10 MB messages would
        # need 10 GB. Jobs composed by their sender (attachment files, DKIM) compose a
        # few at a time, each holding its place until its bytes fit.
        self._bytes = ByteBudget(settings.pool.max_bytes_in_flight)
        self._compose_ahead = asyncio.Semaphore(COMPOSE_AHEAD)
        self._source: _ChunkReader | None = None
        self._composing: ComposeProcess | None = None  # the compose stage's own process, when there is one
        self._said: set[str] = set()
        self._unrecorded: list[str] = []  # ids delivered whose result could not be written
        self._announce: list[tuple[str, dict[str, Any]]] = []  # logged once the display is up
        if options.jobs == "-":
            self.base = Path.cwd()
        else:
            self.base = Path(os.path.abspath(options.jobs)).parent
        self.attachments_root = options.attachments_root or settings.jobs.attachments_root or self.base
        self.composer: Composer | None = None  # the compose stage, made by _open (it reads the DKIM key)
        try:
            store = open_store(settings.suppression, settings.redis.url)
        except StoreError as exc:
            raise RunError(str(exc)) from None
        self.admission = Admission(store, auto=settings.suppression.auto, refresh=settings.suppression.refresh,
                                   registry=self.registry)

    # -- results --

    def _record(self, line: int, job_id: str | None, status: str, size: int, **fields: Any) -> None:
        result = result_row(job_id, line, status, **fields)
        try:
            self.journal.record(result)
        except OSError as exc:
            if status == "sent":
                self._unrecorded.append(job_id if job_id is not None else f"line {line}")
            raise _ResultsUnwritable(
                f"cannot write the results file {self.options.results}: {exc.strerror or exc}; run stopped "
                "(jobs without a result are sent again by the next run)") from exc
        self._count(status, size)

    def _skip(self, size: int, job_id: str | None, number: int) -> None:
        """A line an earlier run finished. If that run recorded it failed or invalid,
        this run cannot end with "every job sent" (exit 1)."""
        self._count("skipped", size)
        if self.journal.unsent_before(job_id, number):
            self.tally.unsent_before += 1

    def _count(self, status: str, size: int) -> None:
        self.tally.counts[status] += 1
        self.tally.bytes_done += size

    # -- the run --

    def _open(self) -> None:
        """Open the jobs and lock the results file. Raises RunError."""
        root = self.attachments_root
        if not root.is_dir():
            raise RunError(f"attachments root {root}: not a directory")
        where = self.settings.templates.dir
        if where != TemplatesSettings().dir and not where.is_dir():  # configured (the default may be absent)
            # Every templated job would fail alike: say it before anything is sent or recorded.
            raise RunError(f"templates.dir: {str(where)!r} does not exist (a relative directory is "
                           f"taken from {str(Path.cwd())!r})")
        try:
            self.admission.load()
        except StoreError as exc:
            raise RunError(str(exc)) from None
        finally:
            self.admission.store.close()  # no SQLite connection across the compose process's fork
        try:
            # The batch, from which Message-IDs are derived, is the results file (docs/run.md).
            self.composer = Composer(self.settings, base_dir=self.base, attachments_root=root,
                                     batch=os.path.abspath(self.options.results))
        except ValueError as exc:
            raise RunError(str(exc)) from None
        if self.options.jobs == "-":
            fd = os.dup(0)
        else:
            try:
                fd = os.open(self.options.jobs, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
            except OSError as exc:
                raise RunError(f"{self.options.jobs}: cannot read the jobs file: {exc.strerror or exc}") from None
        try:
            mode = os.fstat(fd).st_mode
            if stat.S_ISDIR(mode):
                raise RunError(f"{self.options.jobs}: is a directory, not a jobs file")
            if stat.S_ISREG(mode):
                self.tally.bytes_total = os.fstat(fd).st_size
            # A FIFO stays non-blocking: it was opened before its writer, and a read then
            # would see the end of the file at once. The reader waits for data first.
            fifo = stat.S_ISFIFO(mode) and self.options.jobs != "-"
            if self.options.jobs != "-" and not fifo:
                os.set_blocking(fd, True)  # the open was non-blocking only so that a FIFO opens at once
            _check_results_file(self.options.results, os.fstat(fd))
            self.journal.open()
        except JournalBusy as exc:
            os.close(fd)
            raise RunError(str(exc)) from None
        except OSError as exc:
            os.close(fd)
            raise RunError(f"{self.options.results}: cannot use the results file: {exc.strerror or exc}") from None
        except BaseException:
            os.close(fd)
            raise
        # Only for a regular file: a pipe or terminal is read line by line as it comes.
        wanted = self.options.compose_process
        if stat.S_ISREG(mode) and (wanted or (wanted is None and compose_process_usable())):
            try:
                self._composing = ComposeProcess(self.composer, fd, self.journal)  # it owns fd now
            except OSError as exc:  # fork refused (memory, process limit): compose here
                log.warning("run.compose_process_unavailable", error=str(exc))
            else:
                fd = self._composing.fileno()
        self._source = _ChunkReader(fd, wait_for_data=fifo)

    async def execute(self) -> int:
        """Run to the end; returns the exit status. Raises RunError before anything is sent."""
        metrics_server = None
        if self.settings.metrics.port is not None:  # first: a busy port is the only line said, no file made
            try:
                metrics_server = serve_metrics(self.settings.metrics.address, self.settings.metrics.port,
                                               self.registry)
            except MetricsError as exc:
                raise RunError(str(exc)) from None
            self._announce.append(("run.metrics", {"url": metrics_server.url}))
        try:
            self._open()
        except BaseException:
            if metrics_server is not None:
                metrics_server.stop()
            raise
        assert self._source is not None
        sending: Sending | None = None
        try:
            sending = await build_sender(self.settings, self.registry, maildir=self.options.maildir,
                                         command="dispatcher")
            self.pool, where = sending.sender, sending.where
            self._announce.append(("run.start", {"jobs": self.options.jobs, "results": str(self.options.results),
                                                 **where, "size": self.pool.size, "resumed": self.journal.resumed}))
            with self._signals():
                await self._pump(self.pool)
        finally:
            if self._composing is not None:
                self._composing.close()
            self._source.close()
            try:
                # A run that stopped on its configuration or the relay before its first
                # result leaves no empty results file of its own behind.
                self.journal.close(discard_unused=self._stop_code in (ExitCode.USAGE, ExitCode.RELAY_DOWN))
            except OSError as exc:  # the last fsync: results of this run may not be on disk
                self._error(f"cannot write the results file {self.options.results}: {exc.strerror or exc}")
                if self._stop_code is None:
                    self._stop_code = ExitCode.USAGE
            if sending is not None:
                await sending.close()
            if self.settings.metrics.textfile is not None and self.pool is not None:  # the run started
                self.tally.finished = time.time()
                problem = write_textfile(self.settings.metrics.textfile, self.registry)
                if problem is not None:
                    self._error(problem)
            if metrics_server is not None:
                metrics_server.stop()
        if self._unrecorded:  # the operator may want to know: the next run sends them again
            shown = ", ".join(repr(i) for i in self._unrecorded[:20])
            more = f" and {len(self._unrecorded) - 20} more" if len(self._unrecorded) > 20 else ""
            self._error(f"{len(self._unrecorded)} message(s) were delivered but their results could not be "
                        f"written; the next run sends them again: {shown}{more}")
        counts = self.tally.counts
        elapsed = time.monotonic() - self.tally.started
        log.info("run.summary", **counts, elapsed_s=round(elapsed, 3), rate=round(self.tally.rate(), 1),
                 skipped_not_sent=self.tally.unsent_before, blank_lines=self.tally.blank,
                 stopped_by_signal=self.signalled)
        if self._stop_code is not None:
            return self._stop_code
        return ExitCode.FAILED if counts["failed"] or counts["invalid"] or self.tally.unsent_before else ExitCode.OK

    async def _pump(self, pool: Sender) -> None:
        # One sender per message the pool can hold (its sessions and its queue).
        self._room = asyncio.Semaphore(pool.size + pool.queue_size)
        progress = asyncio.create_task(self._progress())
        watch = asyncio.create_task(self.admission.watch())  # the suppression list, changed by others
        await asyncio.sleep(0)  # the live display is up: these lines go above it, wrapped to the terminal
        for event, fields in self._announce:
            log.info(event, **fields)
        try:
            async with asyncio.TaskGroup() as group:
                reader = group.create_task(self._read(pool, group))
                stopped = group.create_task(self._stop.wait())
                await asyncio.wait({reader, stopped}, return_when=asyncio.FIRST_COMPLETED)
                if not self._stop.is_set():  # every line read: wait for the last results
                    idle = group.create_task(self._idle.wait())
                    await asyncio.wait({idle, stopped}, return_when=asyncio.FIRST_COMPLETED)
                    idle.cancel()
                stopped.cancel()
                if self._stop.is_set():
                    reader.cancel()
                    # Queued messages fail with PoolClosedError (not recorded); those on
                    # the wire finish and are recorded. A second signal terminates.
                    await pool.close(drain=False)
            await pool.close()  # every result is in: QUIT the sessions
        finally:
            progress.cancel()
            watch.cancel()
            await asyncio.gather(progress, watch, return_exceptions=True)

    def _halt(self, code: int, message: str | None = None) -> None:
        """Stop the run early (the first reason gives the exit status)."""
        if message is not None:
            self._error(message)
        if not self._stop.is_set():
            self._stop_code = code
            self._stop.set()

    def _error(self, message: str) -> None:
        """One line on stderr, once (every sender may hit the same full disk)."""
        if message not in self._said:
            self._said.add(message)
            print(f"dispatcher: {message}", file=sys.stderr, flush=True)

    async def _read(self, pool: Sender, group: asyncio.TaskGroup) -> None:
        try:
            # A session first: a wrong password, an untrusted certificate or a relay that
            # is down ends the run before any line is read or recorded.
            await pool.connect()
            if self._composing is not None:
                await self._read_composed(pool, group)
            else:
                await self._read_lines(pool, group)
        except _ResultsUnwritable as exc:
            self._halt(ExitCode.USAGE, str(exc))
        except RelayError as exc:
            self._halt(ExitCode.RELAY_DOWN if exc.transient else ExitCode.USAGE, str(exc))
        except ComposeProcessError as exc:
            self._halt(ExitCode.USAGE, f"{exc}; run stopped")
        except TempFileError as exc:
            self._halt(ExitCode.USAGE, f"{exc.strerror}; run stopped")
        except OSError as exc:
            self._halt(ExitCode.USAGE, f"{self.options.jobs}: cannot read the jobs file: {exc.strerror or exc}")
        except Exception as exc:  # a bug: stop the run, never hang
            log.exception("run.reader_failed")
            self._halt(ExitCode.USAGE, f"internal error while reading jobs: {type(exc).__name__}: {exc}")

    async def _read_lines(self, pool: Sender, group: asyncio.TaskGroup) -> None:
        """Read, split and compose here (standard input, or one core)."""
        assert self._source is not None
        splitter = LineSplitter()
        while True:
            chunk = await self._source.read(READ_CHUNK)
            self.tally.bytes_read += len(chunk)
            for line in splitter.feed(chunk) if chunk else splitter.end():
                await self._launch(pool, group, self._admit(line))
            if not chunk:
                self._blank(splitter.blank)
                return

    async def _read_composed(self, pool: Sender, group: asyncio.TaskGroup) -> None:
        """The compose process's outcomes, in the file's order: only the run's state here."""
        assert self._source is not None and self._composing is not None
        async for read, batch in self._composing.outcomes(self._source.read):
            self.tally.bytes_read = read
            for number, size, outcome in batch:
                await self._launch(pool, group, self._admit_composed(number, size, outcome))
        self._blank(self._composing.blank)

    def _blank(self, lines: int) -> None:
        """The blank lines of the jobs file, counted once it has been read to its end."""
        self.tally.blank = lines
        self.tally.jobs_read += lines

    async def _launch(self, pool: Sender, group: asyncio.TaskGroup, item: _Item | None) -> None:
        """One sender for a job to send, once the pool has room for it."""
        self.tally.jobs_read += 1
        if item is not None:
            await self._room.acquire()
            if item.outgoing is not None:  # composed already: its bytes are known
                item.held = _message_bytes(item.outgoing)
                try:
                    await self._bytes.acquire(item.held)
                except BaseException:
                    self._room.release()
                    raise
            self._senders += 1
            self._idle.clear()
            group.create_task(self._send(pool, item))
        if self.tally.jobs_read % 64 == 0:
            await asyncio.sleep(0)  # let senders, results, signals and progress through

    def _admit(self, line: Line) -> _Item | None:
        """Validate a line; record it as invalid or skipped, or return it to send.

        The first line that carries an id owns it: a later line with the same id is an
        invalid duplicate, recorded without an id (keyed by its line number), so that
        its row can never mark the first line done. A row keyed by line number skips
        that line only while it still has no id of its own: a line fixed since (or
        shifted by an edit) is judged by its id."""
        size = line.size
        assert self.composer is not None
        try:
            job = self.composer.parse(line)
        except JobError as exc:
            self._admit_unparsed(line.number, size, exc)
            return None
        retry = self._claim(line.number, job.id, size)
        if retry is None:
            return None
        if self.composer.off_loop(job):
            return _Item(line.number, job.id, size, None, job, retry)
        try:
            return _Item(line.number, job.id, size, self.composer.finish(job), retry=retry)
        except JobError as exc:
            self._invalid(line.number, job.id, exc, size)
            return None

    def _admit_unparsed(self, number: int, size: int, exc: JobError) -> None:
        """A line that is not a valid job: invalid, keyed by its id when it has a
        readable one of its own, else by its line number; skipped when done before."""
        job_id = exc.job_id
        if job_id is not None:
            claim, _ = self.journal.claim(job_id, number)
            if claim is Claim.DONE:
                self._skip(size, job_id, number)
                return
            if claim is Claim.DUPLICATE:
                job_id = None
        if job_id is None and self.journal.line_done(number):
            self._skip(size, None, number)  # recorded by line number by an earlier run
            return
        self._invalid(number, job_id, exc, size)

    def _claim(self, number: int, job_id: str, size: int) -> bool | None:
        """Claim a valid job's id for this line: None when it is not to be sent (done
        by an earlier run, or a duplicate: counted or recorded here), else whether it
        is a ``--retry-failed`` retry of an earlier result."""
        claim, first = self.journal.claim(job_id, number)
        if claim is Claim.DONE and not self.journal.may_retry(job_id):
            self._skip(size, job_id, number)
            return None
        if claim is Claim.DUPLICATE:
            if self.journal.line_done(number):
                self._skip(size, None, number)
            else:
                self._invalid(number, None, JobError("id", f"duplicate of line {first}'s id {job_id!r}"), size)
            return None
        return claim is Claim.DONE

    def _admit_composed(self, number: int, size: int, outcome: Ready | Invalid | Done) -> _Item | None:
        """``_admit`` for a line the compose process already composed: the same claims,
        in the same order, with the same results (a composed job that failed after
        parsing is judged by its id first, as ``_admit`` does before finishing it)."""
        if isinstance(outcome, Done):  # an earlier run's: skipped, or a duplicate of this file
            if self._claim(number, outcome.job_id, size) is not None:
                raise RuntimeError(f"line {number}: the compose process took id {outcome.job_id!r} for done")
            return None
        if isinstance(outcome, Invalid) and not outcome.parsed:
            self._admit_unparsed(number, size, outcome.error)
            return None
        job_id = outcome.job_id if isinstance(outcome, Ready) else outcome.error.job_id
        assert job_id is not None
        retry = self._claim(number, job_id, size)
        if retry is None:
            return None
        if isinstance(outcome, Invalid):
            self._invalid(number, job_id, outcome.error, size)
            return None
        return _Item(number, job_id, size, outcome.outgoing, retry=retry)

    def _invalid(self, number: int, job_id: str | None, exc: JobError, size: int) -> None:
        if self._stop.is_set():
            return  # not recorded: the run stopped before this line, the next run judges it
        if exc.field in SETTINGS_FIELDS:  # every job would fail alike: stop, record nothing more
            self._halt(ExitCode.USAGE, f"{exc}; the run stopped at line {number} (nothing recorded from it on): fix "
                                   "the configuration and run the same command")
            return
        message = f"line {number}: {exc}"
        log.warning("job.invalid", line=number, id=job_id, field=exc.field, error=str(exc))
        self._record(number, job_id, "invalid", size, error=message)

    async def _send(self, pool: Sender, item: _Item) -> None:
        try:
            await self._deliver(pool, item)
        except _ResultsUnwritable as exc:
            self._halt(ExitCode.USAGE, str(exc))
        except Exception as exc:  # a bug: stop the run, never hang
            log.exception("run.sender_failed", line=item.line, id=item.job_id)
            self._halt(ExitCode.USAGE, f"internal error on line {item.line}: {type(exc).__name__}: {exc}")
        finally:
            self._bytes.release(item.held)
            self._room.release()
            self._senders -= 1
            if self._senders == 0:
                self._idle.set()

    async def _deliver(self, pool: Sender, item: _Item) -> None:
        number, job_id, size = item.line, item.job_id, item.size
        outgoing = item.outgoing
        if outgoing is None:
            assert item.job is not None and self.composer is not None
            async with self._compose_ahead:
                try:  # attachment files are read and RSA runs here, never on the event loop
                    outgoing = await asyncio.to_thread(self.composer.finish, item.job)
                except JobError as exc:
                    self._invalid(number, job_id, exc, size)
                    return
                held = _message_bytes(outgoing)
                await self._bytes.acquire(held)
                item.held = held
        recipients = outgoing.recipients
        if item.retry:
            recipients = self.journal.to_retry(job_id, recipients)
            if not recipients:
                self._count("skipped", size)
                return
        asked = recipients
        recipients, suppressed = self.admission.admit(recipients)
        if not recipients:  # every recipient is on the suppression list: nothing to send
            # On --retry-failed the row is about the recipients retried, not the whole
            # job: an earlier delivery to the others stays on record.
            self._record(number, job_id, "suppressed", size, suppressed=suppressed,
                         recipients=list(asked) if item.retry else None)
            return
        if self._stop.is_set():
            return  # not submitted: the next run sends it
        started = time.monotonic()
        retried = recipients if item.retry else None
        try:
            if outgoing.envelope is not None:  # prepared by the compose process
                envelope = outgoing.envelope
                if len(recipients) != len(envelope.recipients):
                    envelope = for_recipients(envelope, recipients)
                result = await pool.submit(envelope, envelope_id=envelope_id_for(job_id))
            else:
                result = await pool.submit(outgoing.message, sender=outgoing.sender, recipients=recipients,
                                           prepared=outgoing.prepared, envelope_id=envelope_id_for(job_id))
        except DeliveryError as exc:
            self._record(number, job_id, "failed", size, attempts=exc.attempts, code=exc.code,
                         response=exc.response, refused=exc.refused, error=str(exc),
                         elapsed_ms=_ms(started), recipients=retried, suppressed=suppressed,
                         message_id=exc.message_id,
                         relay=getattr(exc, "relay", None))  # set by SMTPRouter once DeliveryError carries it
            await self.admission.refused(job_id, exc.refused)
        except RelayError as exc:
            # Not the message's fault: not recorded, so the next run sends it.
            self._halt(ExitCode.RELAY_DOWN if exc.transient else ExitCode.USAGE, str(exc))
        except PoolClosedError:
            pass  # never sent (or not known to be): not recorded, so a re-run sends it
        except ValueError as exc:
            self._invalid(number, job_id, JobError("", str(exc)), size)
        else:
            self._record(number, job_id, "sent", size, attempts=result.attempts, code=result.code,
                         response=result.response, refused=result.refused, suppressed=suppressed,
                         elapsed_ms=round(result.elapsed * 1000, 1), recipients=retried, relay=result.relay,
                         message_id=result.message_id)
            await self.admission.refused(job_id, result.refused, delivered=True)

    async def _progress(self) -> None:
        """The live display on a terminal (``--progress`` forces it), else a
        ``run.progress`` log line every ``LOG_PROGRESS_EVERY`` seconds. Started before
        the reader, so that every log line of the run is printed above the display."""
        if self.options.progress is False:
            return
        if self.options.progress or sys.stderr.isatty():
            with LiveDisplay(self.tally, force=bool(self.options.progress)) as display:
                while True:
                    await asyncio.sleep(TTY_PROGRESS_EVERY)
                    display.refresh()
        # The rate of the last few periods, not since the start: a relay that died a
        # minute ago shows as 0/s, not as a slowly sinking average.
        speed = Speed(window=3 * LOG_PROGRESS_EVERY)
        while True:
            await asyncio.sleep(LOG_PROGRESS_EVERY)
            log.info("run.progress", **self.tally.counts, **progress_fields(self.tally, speed),
                     queue_depth=self.pool.queue_depth() if self.pool else 0)

    @contextmanager
    def _signals(self) -> Iterator[None]:
        def stop(signum: int) -> None:
            name = signal.Signals(signum).name
            if self._stop.is_set():
                # A second signal (or a signal after an error stopped the run): drop
                # every session now; what was on the wire is not recorded.
                log.warning("run.terminating", signal=name)
                if self.pool is not None:
                    self.pool.terminate()
                return
            self.signalled = True
            log.warning("run.stopping", signal=name)
            self._halt(ExitCode.SIGNAL, f"{name}: stopping; the messages on the wire finish, the rest are not sent "
                                    "(the next run sends them). A second signal stops at once.")

        with signal_handlers(stop):
            yield


class _ChunkReader:
    """Reads a file descriptor in a thread of its own, one chunk per request.

    The event loop never blocks on the jobs (a slow producer on a pipe, a terminal, a
    network file system): each line is handled as soon as it arrives, and signals are
    served while the input is idle. The thread is a daemon that owns the descriptor:
    a read blocked on an idle pipe cannot delay the end of the run, and the descriptor
    is closed by the thread once it is out of ``read`` (never under it)."""

    def __init__(self, fd: int, *, wait_for_data: bool = False) -> None:
        self._fd = fd
        self._wait = wait_for_data  # a FIFO opened before its writer: a read waits until it comes
        self._requests: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[bytes], int] | None] = (
            queue.SimpleQueue())
        self._thread = threading.Thread(target=self._serve, name="dispatcher-jobs-reader", daemon=True)
        self._thread.start()

    async def read(self, size: int) -> bytes:
        """Up to ``size`` bytes, as soon as any are there; b"" at the end. Raises OSError."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[bytes] = loop.create_future()
        self._requests.put((loop, future, size))
        return await future

    def close(self) -> None:
        self._requests.put(None)

    def _serve(self) -> None:
        try:
            while (request := self._requests.get()) is not None:
                loop, future, size = request
                try:
                    outcome: bytes | OSError = _read_blocking(self._fd, size, self._wait)
                except OSError as exc:
                    outcome = exc
                try:
                    loop.call_soon_threadsafe(_settle, future, outcome)
                except RuntimeError:  # the loop is closed: nobody is waiting any more
                    return
        finally:
            os.close(self._fd)


def _read_blocking(fd: int, size: int, wait: bool = False) -> bytes:
    while True:
        if wait:
            # Readable once data is there or a writer has come and gone (a FIFO's end):
            # until its first writer, a non-blocking read of a FIFO is a false end.
            select.select([fd], [], [])
        try:
            return os.read(fd, size)
        except BlockingIOError:  # a descriptor left non-blocking by whoever gave it to us
            select.select([fd], [], [])


def _settle(future: asyncio.Future[bytes], outcome: bytes | OSError) -> None:
    if future.done():  # the reader was cancelled
        return
    if isinstance(outcome, OSError):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _check_results_file(results: Path, jobs: os.stat_result) -> None:
    """The results file is a regular file, not the jobs file (it would be appended to
    the jobs being read). Raises RunError naming it."""
    try:
        found = os.stat(results)
    except OSError:
        return  # not there yet (created by the journal), or the journal says why not
    if not stat.S_ISREG(found.st_mode):
        kind = "a directory" if stat.S_ISDIR(found.st_mode) else "a pipe or FIFO" if stat.S_ISFIFO(found.st_mode) else (
            "a device or socket")
        raise RunError(f"{results}: the results file must be a regular file, not {kind}")
    if (found.st_dev, found.st_ino) == (jobs.st_dev, jobs.st_ino):
        raise RunError(f"{results}: the results file is the jobs file; name another one with --results")


def _message_bytes(outgoing: Outgoing) -> int:
    return len(outgoing.envelope.content) if outgoing.envelope is not None else len(outgoing.message)


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)
