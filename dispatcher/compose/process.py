"""The compose stage in other processes, for ``dispatcher run`` on a regular jobs file.

Reading, validating, rendering, building and signing a job costs about as much CPU as
its whole SMTP exchange, and a DKIM signature several times that. On a machine with
more than one core, forked children read the jobs file and run ``Composer.compose``
on its lines; the event loop process gets the outcomes in order, in batches over one
pipe, and does only what needs the run's state: the resume index and duplicates
(``Journal.claim``), the pool and the results file. Same lines, same order, same
outcomes as composing in-process, so resume, duplicates, signals and error order
behave exactly alike.

How many children: ``jobs.compose_processes``; by default one per core when DKIM is
on (signing is most of a job's CPU), else one. With N children every child reads the
whole file (``pread``, its own offset) and cuts it into the same lines; the lines come
in blocks of ``BATCH_LINES``, and block b is composed by child b mod N. The children
write to the one pipe in block order: a token goes round a ring of small pipes, and
only the child that holds it writes; it passes it on after the last frame of its
block. So the parent reads exactly the stream one child would have written.

The children hold no state worth keeping: they ignore SIGINT (a Ctrl-C reaches the
whole process group; the parent decides), are killed when the run ends, and die on
their next write when the parent is gone (the pipe breaks). When one dies, the
others find its end of the ring closed and end too, so the pipe closes and the
parent stops with a clear error instead of waiting. Each closes every descriptor it
inherited but the jobs file and its pipes, so none holds the results file's lock.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from dispatcher.batch.journal import Journal
from dispatcher.compose.jobs import JobError, LineSplitter, Outgoing
from dispatcher.compose.stage import Composer, Done, Invalid, Ready
from dispatcher.loop.verp import envelope_id_for
from pool import Envelope, prepare

READ_CHUNK = 1 << 18
BATCH_LINES = 64
BATCH_BYTES = 1 << 18
PIPE_SIZE = 1 << 20  # F_SETPIPE_SZ: a few batches in flight, so neither side waits on the other
MAX_PROCESSES = 64
AHEAD_BLOCKS = 4  # blocks a compose process may hold, composed, before its turns to write them
AHEAD_BYTES = 4 * BATCH_BYTES
_F_SETPIPE_SZ = 1031
_HEAD = struct.Struct("<I")


class ComposeProcessError(Exception):
    """A compose process ended before the last job (a bug, or it was killed)."""


#: One line's outcome: (line number, bytes of the line, Ready | Invalid | Done).
Composed = tuple[int, int, Ready | Invalid | Done]


def cores() -> int:
    """The cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def usable() -> bool:
    """Another process pays off: this process may use 2+ cores (the caller checks that
    the jobs are a regular file)."""
    return cores() > 1


def process_count(composer: Composer) -> int:
    """How many compose processes: ``jobs.compose_processes`` when set; else one per
    core when the composer signs (DKIM), else one."""
    wanted: int | None = getattr(composer, "compose_processes", None)
    if wanted is not None:
        return wanted
    return max(1, min(cores(), MAX_PROCESSES)) if composer.signers else 1


class ComposeProcess:
    """Forked children composing the lines of ``fd`` (``processes`` of them, default
    ``process_count(composer)``); ``outcomes()`` yields them in the file's order."""

    def __init__(self, composer: Composer, fd: int, journal: Journal, processes: int | None = None) -> None:
        count = processes if processes is not None else process_count(composer)
        if count < 1:
            raise ValueError("processes: at least 1")
        read_end, write_end = os.pipe()
        try:
            import fcntl

            fcntl.fcntl(write_end, _F_SETPIPE_SZ, PIPE_SIZE)
        except (ImportError, OSError):
            pass  # the default 64 KiB pipe works, a little slower
        # The ring: child i reads its turn from ring[i] and passes it on through ring[i + 1].
        ring: list[tuple[int, int]] = []
        pids: list[int] = []
        try:
            if count > 1:
                ring = [os.pipe() for _ in range(count)]
            for index in range(count):
                turn_in = ring[index][0] if ring else -1
                turn_out = ring[(index + 1) % count][1] if ring else -1
                pid = os.fork()
                if pid == 0:  # a child: never returns
                    status = 1
                    try:
                        os.close(read_end)
                        _child(composer, fd, write_end, journal, _Turn(turn_in, turn_out, index == 0),
                               index, count)
                        status = 0
                    finally:
                        os._exit(status)
                pids.append(pid)
        except OSError:
            for pid in pids:  # fork refused for one: none composes, the caller composes in-process
                _kill_and_reap(pid)
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
            for pair in ring:
                for end in pair:
                    os.close(end)
        os.close(fd)  # the children read the jobs; the parent never does
        self.pids = pids
        self.pid = pids[0]
        self._fd = read_end
        self._buffer = bytearray()
        self._status: int | None = None
        self._read = 0
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
                self._read = max(self._read, frame[1])  # each child reads the file at its own pace
                yield self._read, [_decode(item) for item in frame[2]]
            elif kind == "E":
                self.blank = frame[2]
                # The children exit next: the pipe closes when the last one does, and then
                # they are reaped, not left zombies for the rest of the run.
                while await read(PIPE_SIZE):
                    pass
                self._reap()
                yield max(self._read, frame[1]), []
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
        """Stop the children (they have nothing to save) and reap them. The pipe is
        closed by whoever reads it."""
        if self._status is None:
            for pid in self.pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self._reap()

    def _reap(self) -> int | None:
        """Wait for every child; the status of the first that did not exit with 0."""
        if self._status is None:
            statuses = []
            for pid in self.pids:
                try:
                    _, status = os.waitpid(pid, 0)
                except ChildProcessError:
                    statuses.append(-1)
                else:
                    statuses.append(os.waitstatus_to_exitcode(status))
            self._status = next((status for status in statuses if status != 0), 0)
        return self._status


def _kill_and_reap(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


class _End(Exception):
    """The ring says the run is over (or a neighbour is gone): end quietly."""


class _Turn:
    """Whose turn it is to write to the shared pipe: a token that goes round a ring of
    pipes, one byte a block. With one child (no ring) it is always that child's."""

    def __init__(self, inbound: int, outbound: int, held: bool) -> None:
        self.inbound, self.outbound = inbound, outbound
        self.held = held or inbound < 0
        self._poll: select.poll | None = None

    def take(self) -> None:
        """Wait for the turn. Raises _End when the file is done or a neighbour is gone."""
        if not self.held:
            token = os.read(self.inbound, 1)  # b"" when the one before us died
            if token != b"t":
                self.give(b"e")  # pass the end on, so every child ends
                raise _End
            self.held = True

    def ready(self) -> bool:
        """Take the turn if it has come; never waits."""
        if not self.held:
            if self._poll is None:
                self._poll = select.poll()
                self._poll.register(self.inbound, select.POLLIN)
            if not self._poll.poll(0):
                return False
            self.take()
        return True

    def give(self, token: bytes = b"t") -> None:
        """Pass the turn (``b"t"``) or the end (``b"e"``) to the next child."""
        if self.outbound >= 0:
            self.held = False
            try:
                os.write(self.outbound, token)
            except BrokenPipeError:
                pass  # the next one has ended already


class _Writer:
    """A child's frames, written to the shared pipe in its turns, one block a turn.

    A child composes up to ``AHEAD_BLOCKS`` blocks (``AHEAD_BYTES``) before their
    turns come, so one that is slow for a while (a big job, the scheduler) does not
    stall the others at every block. A block still being composed is written as it
    grows once it is the oldest and the turn is ours, and the turn stays ours until
    it is complete."""

    def __init__(self, out: int, turn: _Turn) -> None:
        self.out, self.turn = out, turn
        self.blocks: deque[list[bytes]] = deque()  # frames not yet written, block by block
        self.open = False  # the last block is still being composed
        self.held = 0  # bytes in self.blocks

    def add(self, frame: tuple[Any, ...]) -> None:
        data = pickle.dumps(frame, protocol=pickle.HIGHEST_PROTOCOL)
        if not self.open:
            self.blocks.append([])
            self.open = True
        self.blocks[-1].append(_HEAD.pack(len(data)) + data)
        self.held += _HEAD.size + len(data)
        self.flush()

    def close_block(self) -> None:
        self.open = False
        self.flush()

    def finish(self) -> None:
        """Write every frame (the last block is complete), waiting for each turn."""
        self.open = False
        self.flush(wait=True)

    def _ahead(self) -> bool:
        return self.held > AHEAD_BYTES or len(self.blocks) - self.open > AHEAD_BLOCKS

    def flush(self, *, wait: bool = False) -> None:
        while self.blocks:
            if not self.turn.held:
                if wait or self._ahead():
                    self.turn.take()
                elif not self.turn.ready():
                    return
            frames = self.blocks[0]
            for data in frames:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.out, view):]  # BrokenPipeError when the parent is gone
                self.held -= len(data)
            if len(self.blocks) == 1 and self.open:
                frames.clear()  # the block being composed: the turn stays ours until it is complete
                return
            self.blocks.popleft()
            self.turn.give()


def _child(composer: Composer, fd: int, out: int, journal: Journal, turn: _Turn, index: int, count: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C, and then kills us
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a service manager's stop, too: the run ends us
    try:
        signal.set_wakeup_fd(-1)  # the parent's event loop's: never write into it
    except ValueError:
        pass
    _close_inherited({fd, out, 0, 1, 2, journal.reader_fd(), turn.inbound, turn.outbound})
    writer = _Writer(out, turn)

    # What is composed goes out before any error: in-process, the lines before a failed
    # read or a bug are handled too.
    batch: list[tuple[Any, ...]] = []
    read = 0
    try:
        splitter = LineSplitter()
        held = 0
        lines = 0  # lines (not blank) of the file so far, every child's and ours
        while True:
            try:
                chunk = os.pread(fd, READ_CHUNK, read)
            except OSError as exc:
                if batch:
                    writer.add(("B", read, batch))
                writer.add(("O", exc.errno, exc.strerror or str(exc)))
                writer.finish()
                return
            read += len(chunk)
            for line in splitter.feed(chunk) if chunk else splitter.end():
                block, lines = lines // BATCH_LINES, lines + 1
                if block % count != index:
                    continue  # another child's
                # A job an earlier run finished is not composed again (the journal as
                # loaded when this process was forked says which).
                item = _encode(line.number, line.size, composer.compose(line, journal.done_earlier))
                batch.append(item)
                held += line.size + (len(item[5]) if isinstance(item[5], bytes) else 0)
                if lines % BATCH_LINES == 0:  # the block's last line: then the next child's turn
                    writer.add(("B", read, batch))
                    writer.close_block()
                    batch, held = [], 0
                elif held >= BATCH_BYTES:  # a block of big messages goes in several frames
                    writer.add(("B", read, batch))
                    batch, held = [], 0
            if not chunk:
                break
        if batch:  # the last block, ours, shorter than the others
            writer.add(("B", read, batch))
        writer.finish()
        # The child whose turn would be next writes the end; the others hear of it.
        if -(-lines // BATCH_LINES) % count == index:
            turn.take()
            writer.add(("E", read, splitter.blank))
            turn.give(b"e")
        else:
            turn.take()  # only the end comes now: _End
    except (BrokenPipeError, _End):
        return
    except Exception as exc:  # noqa: BLE001  # a bug: say so, the parent stops the run with it
        try:
            if batch:
                writer.add(("B", read, batch))
            writer.add(("X", f"{type(exc).__name__}: {exc}"))
            writer.finish()
        except (OSError, _End):
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
        return (number, size, outcome.job_id, None, None, None, None, None, None)
    if isinstance(outcome, Ready):
        o = outcome.outgoing
        try:  # what SMTPPool.submit would do first, done here: the loop process only sends
            e = prepare(o.message, sender=o.sender, recipients=o.recipients, prepared=o.prepared)
        except ValueError as exc:
            outcome = Invalid(number, JobError("", str(exc), outcome.job_id), parsed=True)
        else:
            # Its DSN ENVID too, worked out here: the loop process submits the envelope as it is.
            return (number, size, outcome.job_id, e.sender, e.recipients, e.content, e.message_id, e.all_ascii,
                    envelope_id_for(outcome.job_id))
    error = outcome.error
    return (number, size, None, error.field, str(error), error.job_id, outcome.parsed, None, None)


def _decode(item: tuple[Any, ...]) -> Composed:
    number, size, job_id, a, b, c, d, e, envelope_id = item
    if job_id is not None and a is None:  # done by an earlier run: not composed
        return number, size, Done(number, job_id)
    if job_id is not None:
        envelope = Envelope(a, b, c, d, e, envelope_id)
        return number, size, Ready(number, job_id, Outgoing(b"", a, list(b), prepared=True, envelope=envelope))
    return number, size, Invalid(number, JobError.restore(a, b, c), parsed=d)
