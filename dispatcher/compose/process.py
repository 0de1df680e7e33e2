"""The compose stage in a second process, for ``dispatcher run`` on a regular jobs file.

Reading, validating, rendering, building and signing a job costs about as much CPU as
its whole SMTP exchange. On a machine with more than one core, a forked child reads
the jobs file and runs ``Composer.compose`` on every line; the event loop process
gets the outcomes in order, in batches over a pipe, and does only what needs the
run's state: the resume index and duplicates (``Journal.claim``), the pool and the
results file. Same lines, same order, same outcomes as composing in-process, so
resume, duplicates, signals and error order behave exactly alike.

The child holds no state worth keeping: it ignores SIGINT (a Ctrl-C reaches the whole
process group; the parent decides), is killed when the run ends, and dies on its next
write when the parent is gone (the pipe breaks). It closes every descriptor it
inherited but the jobs file and its pipe, so it never holds the results file's lock.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
from collections.abc import AsyncIterator
from typing import Any

from dispatcher.batch.journal import Journal
from dispatcher.compose.jobs import JobError, LineSplitter, Outgoing
from dispatcher.compose.stage import Composer, Done, Invalid, Ready
from pool import Envelope, prepare

READ_CHUNK = 1 << 18
BATCH_LINES = 64
BATCH_BYTES = 1 << 18
PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: a few batches in flight, so neither side waits on the other
_F_SETPIPE_SZ = 1031
_HEAD = struct.Struct("<I")


class ComposeProcessError(Exception):
    """The compose process ended before the last job (a bug, or it was killed)."""


#: One line's outcome: (line number, bytes of the line, Ready | Invalid | Done).
Composed = tuple[int, int, Ready | Invalid | Done]


def usable() -> bool:
    """A second process pays off: this process may use 2+ cores (the caller checks that
    the jobs are a regular file)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return cores > 1


class ComposeProcess:
    """A forked child composing the lines of ``fd``; ``outcomes()`` yields them in order."""

    def __init__(self, composer: Composer, fd: int, journal: Journal) -> None:
        read_end, write_end = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        except (ImportError, OSError):
            pass  # the default 64 KiB pipe works, a little slower
        try:
            pid = os.fork()
        except OSError:
            os.close(read_end)
            os.close(write_end)
            raise  # the caller composes in-process; fd is still its own
        if pid == 0:  # the child: never returns
            status = 1
            try:
                os.close(read_end)
                _child(composer, fd, write_end, journal)
                status = 0
            finally:
                os._exit(status)
        os.close(write_end)
        os.close(fd)  # the child reads the jobs; the parent never does
        self.pid = pid
        self._fd = read_end
        self._buffer = bytearray()
        self._status: int | None = None
        self.blank = 0  # blank lines of the jobs file, known at its end

    async def outcomes(self, read: Any) -> AsyncIterator[tuple[int, list[Composed]]]:
        """(bytes of the jobs file read so far, a batch of outcomes) until the end.
        ``read(n)`` is an awaitable read of this object's descriptor (``fileno``).
        Raises OSError when the child could not read the jobs file,
        ComposeProcessError when it ended without finishing."""
        while True:
            frame = await self._frame(read)
            kind = frame[0]
            if kind == "B":
                yield frame[1], [_decode(item) for item in frame[2]]
            elif kind == "E":
                self.blank = frame[2]
                # The child exits next: its end of the pipe closes when it does, and then it
                # is reaped, not left a zombie for the rest of the run.
                while await read(PIPE_SIZE):
                    pass
                self._reap()
                yield frame[1], []
                return
            elif kind == "O":
                raise OSError(frame[1], frame[2])
            else:
                raise ComposeProcessError(f"the compose process failed: {frame[1]}")

    def fileno(self) -> int:
        return self._fd

    async def _frame(self, read: Any) -> tuple[Any, ...]:
        buffer = self._buffer
        while True:
            if len(buffer) >= _HEAD.size:
                (length,) = _HEAD.unpack_from(buffer)
                end = _HEAD.size + length
                if len(buffer) >= end:
                    frame: tuple[Any, ...] = pickle.loads(memoryview(buffer)[_HEAD.size:end])
                    del buffer[:end]
                    return frame
            chunk = await read(PIPE_SIZE)
            if not chunk:
                status = self._reap()
                raise ComposeProcessError(f"the compose process ended before the last job (status {status})")
            buffer += chunk

    def close(self) -> None:
        """Stop the child (it has nothing to save) and reap it. The pipe is closed by
        whoever reads it."""
        if self._status is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self._reap()

    def _reap(self, *, wait: bool = True) -> int | None:
        if self._status is None:
            try:
                pid, status = os.waitpid(self.pid, 0 if wait else os.WNOHANG)
            except ChildProcessError:
                self._status = -1
            else:
                if pid:
                    self._status = os.waitstatus_to_exitcode(status)
        return self._status


def _child(composer: Composer, fd: int, out: int, journal: Journal) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C, and then kills us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a service manager's stop, too: the run ends us
    try:
        signal.set_wakeup_fd(-1)  # the parent's event loop's: never write into it
    except ValueError:
        pass
    _close_inherited({fd, out, 0, 1, 2, journal.reader_fd()})

    def send(frame: tuple[Any, ...]) -> None:
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        view = memoryview(_HEAD.pack(len(data)) + data)
        while view:
            view = view[os.write(out, view):]  # BrokenPipeError when the parent is gone: we end

    # What is composed goes out before any error: in-process, the lines before a failed
    # read or a bug are handled too.
    batch: list[tuple[Any, ...]] = []
    read = 0
    try:
        splitter = LineSplitter()
        held = 0
        while True:
            try:
                chunk = os.read(fd, READ_CHUNK)
            except OSError as exc:
                if batch:
                    send(("B", read, batch))
                send(("O", exc.errno, exc.strerror or str(exc)))
                return
            read += len(chunk)
            for line in splitter.feed(chunk) if chunk else splitter.end():
                # A job an earlier run finished is not composed again (the journal as
                # loaded when this process was forked says which).
                item = _encode(line.number, line.size, composer.compose(line, journal.done_earlier))
                batch.append(item)
                held += line.size + (len(item[5]) if isinstance(item[5], bytes) else 0)
                if len(batch) >= BATCH_LINES or held >= BATCH_BYTES:
                    send(("B", read, batch))
                    batch, held = [], 0
            if not chunk:
                if batch:
                    send(("B", read, batch))
                send(("E", read, splitter.blank))
                return
    except BrokenPipeError:
        return
    except Exception as exc:  # noqa: BLE001  # a bug: say so, the parent stops the run with it
        try:
            if batch:
                send(("B", read, batch))
            send(("X", f"{type(exc).__name__}: {exc}"))
        except OSError:
            pass


def _close_inherited(keep: set[int]) -> None:
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def _encode(number: int, size: int, outcome: Ready | Invalid | Done) -> tuple[Any, ...]:
    if isinstance(outcome, Done):  # parsed, not composed: the parent skips it as it always does
        return (number, size, outcome.job_id, None, None, None, None, None)
    if isinstance(outcome, Ready):
        o = outcome.outgoing
        try:  # what SMTPPool.submit would do first, done here: the loop process only sends
            e = prepare(o.message, sender=o.sender, recipients=o.recipients, prepared=o.prepared)
        except ValueError as exc:
            outcome = Invalid(number, JobError("", str(exc), outcome.job_id), parsed=True)
        else:
            return (number, size, outcome.job_id, e.sender, e.recipients, e.content, e.message_id, e.all_ascii)
    error = outcome.error
    return (number, size, None, error.field, str(error), error.job_id, outcome.parsed, None)


def _decode(item: tuple[Any, ...]) -> Composed:
    number, size, job_id, a, b, c, d, e = item
    if job_id is not None and a is None:  # done by an earlier run: not composed
        return number, size, Done(number, job_id)
    if job_id is not None:
        envelope = Envelope(a, b, c, d, e)
        return number, size, Ready(number, job_id, Outgoing(b"", a, list(b), prepared=True, envelope=envelope))
    return number, size, Invalid(number, JobError.restore(a, b, c), parsed=d)
