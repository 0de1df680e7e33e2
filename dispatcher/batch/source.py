"""The jobs file as the engine's source: read in a thread (never on the event loop),
split into lines and parsed here, or read, validated and composed by the compose
process (``dispatcher.compose.process``) when the jobs are a regular file."""

from __future__ import annotations

import asyncio
import os
import queue
import select
import stat
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass

import structlog

from dispatcher.batch.journal import Journal
from dispatcher.compose.jobs import JobError, Line, LineSplitter
from dispatcher.compose.process import ComposeProcess, ComposeProcessError
from dispatcher.compose.process import usable as compose_process_usable
from dispatcher.compose.stage import Composer, Done, Invalid, Ready
from dispatcher.engine.ports import Delivery, Halt
from dispatcher.engine.tally import Tally
from dispatcher.exit import ExitCode

log = structlog.get_logger("dispatcher")

READ_CHUNK = 1 << 18  # a chunk's lines are split at once: keep it small


class RunError(Exception):
    """The run cannot start (jobs or results file, attachments root): one line for the user."""


@dataclass
class JobsFile:
    """An open jobs file (or standard input, ``name`` "-")."""

    name: str
    fd: int
    status: os.stat_result
    fifo: bool  # a FIFO opened before its writer: a read waits until data comes

    @property
    def regular(self) -> bool:
        return stat.S_ISREG(self.status.st_mode)

    def close(self) -> None:
        os.close(self.fd)


def open_jobs(name: str) -> JobsFile:
    """Open the jobs file (``-``: a copy of standard input). Raises RunError."""
    if name == "-":
        fd = os.dup(0)
    else:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise RunError(f"{name}: cannot read the jobs file: {exc.strerror or exc}") from None
    try:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):
            raise RunError(f"{name}: is a directory, not a jobs file")
        # A FIFO stays non-blocking: it was opened before its writer, and a read then
        # would see the end of the file at once. The reader waits for data first.
        fifo = stat.S_ISFIFO(status.st_mode) and name != "-"
        if name != "-" and not fifo:
            os.set_blocking(fd, True)  # the open was non-blocking only so that a FIFO opens at once
    except BaseException:
        os.close(fd)
        raise
    return JobsFile(name, fd, status, fifo)


class FileSource:
    """Hands out the jobs of ``jobs`` in the file's order, a chunk's lines at a time.
    Owns the file from here on (``close`` it)."""

    def __init__(self, jobs: JobsFile, composer: Composer, tally: Tally, *, journal: Journal,
                 compose_process: bool | None) -> None:
        self.name = jobs.name
        self.composer = composer
        self._tally = tally
        self.composing: ComposeProcess | None = None  # the compose stage's own process, when there is one
        fd = jobs.fd
        # Only for a regular file: a pipe or terminal is read line by line as it comes.
        if jobs.regular and (compose_process or (compose_process is None and compose_process_usable())):
            try:
                self.composing = ComposeProcess(composer, fd, journal)  # it owns fd now
            except OSError as exc:  # fork refused (memory, process limit): compose here
                log.warning("run.compose_process_unavailable", error=str(exc))
            else:
                fd = self.composing.fileno()
        self._reader = _ChunkReader(fd, wait_for_data=jobs.fifo)

    async def batches(self) -> AsyncGenerator[Sequence[Delivery], None]:
        try:
            if self.composing is not None:
                async for batch in self._composed(self.composing):
                    yield batch
            else:
                async for batch in self._parsed():
                    yield batch
        except ComposeProcessError as exc:
            raise Halt(ExitCode.USAGE, f"{exc}; run stopped") from exc
        except OSError as exc:
            raise Halt(ExitCode.USAGE, f"{self.name}: cannot read the jobs file: {exc.strerror or exc}") from exc

    def close(self) -> None:
        if self.composing is not None:
            self.composing.close()
        self._reader.close()

    async def _parsed(self) -> AsyncIterator[list[Delivery]]:
        """Read, split and parse here (standard input, or one core); the engine composes."""
        splitter = LineSplitter()
        while True:
            chunk = await self._reader.read(READ_CHUNK)
            self._tally.bytes_read += len(chunk)
            yield [self._parse(line) for line in (splitter.feed(chunk) if chunk else splitter.end())]
            if not chunk:
                self._blank(splitter.blank)
                return

    def _parse(self, line: Line) -> Delivery:
        try:
            job = self.composer.parse(line)
        except JobError as exc:
            return Delivery(line.number, exc.job_id, line.size, error=exc)
        return Delivery(line.number, job.id, line.size, job=job)

    async def _composed(self, composing: ComposeProcess) -> AsyncIterator[list[Delivery]]:
        """The compose process's outcomes, in the file's order."""
        async for read, batch in composing.outcomes(self._reader.read):
            self._tally.bytes_read = read
            yield [_delivery(number, size, outcome) for number, size, outcome in batch]
        self._blank(composing.blank)

    def _blank(self, lines: int) -> None:
        """The blank lines of the jobs file, counted once it has been read to its end."""
        self._tally.blank = lines
        self._tally.jobs_read += lines


def _delivery(number: int, size: int, outcome: Ready | Invalid | Done) -> Delivery:
    if isinstance(outcome, Ready):
        return Delivery(number, outcome.job_id, size, outgoing=outcome.outgoing)
    if isinstance(outcome, Invalid):
        return Delivery(number, outcome.error.job_id, size, error=outcome.error, parsed=outcome.parsed)
    return Delivery(number, outcome.job_id, size, done=True)  # an earlier run's: skipped, or a duplicate


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
