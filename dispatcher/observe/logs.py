"""structlog setup: JSON lines when stderr is not a terminal, readable output on one.

Standard error is for people; the results file is the record. So nothing written to
stderr may stop, slow or crash a run: ``standard_descriptors()`` puts ``/dev/null``
on a closed descriptor 0, 1 or 2 before anything else opens a file (the event loop's
own descriptors must never land there), and ``protect_stderr()`` makes ``sys.stderr``
a ``DroppingStream``, which hands lines to a writer thread and drops (and counts)
what that thread cannot take at once.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import MutableMapping
from typing import Any, TextIO, cast

import structlog
from rich.console import Console
from rich.file_proxy import FileProxy
from rich.text import Text

_SECRET_KEYS = ("password", "secret", "token", "authorization")
_STANDARD = (("stdin", 0, "r"), ("stdout", 1, "w"), ("stderr", 2, "w"))


def _redact(logger: Any, method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in event:
        if any(word in key.lower() for word in _SECRET_KEYS):
            event[key] = "***"
    return event


def standard_descriptors() -> None:
    """Put ``/dev/null`` on each of descriptors 0, 1 and 2 that is closed, and give
    Python a stream for it. Call it first: the next descriptor opened would otherwise
    take the free number (uvloop aborts when one of its own is 0-2, and ``run -``
    would read from it)."""
    for _, fd, _ in _STANDARD:
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)
    for name, fd, mode in _STANDARD:
        if getattr(sys, name) is None:
            setattr(sys, name, open(fd, mode, closefd=False, encoding="utf-8", errors="backslashreplace"))


class DroppingStream:
    """A text stream that never blocks and never raises: ``sys.stderr`` for a command.

    Lines go to a writer thread through a buffer of ``limit`` bytes; a line that does
    not fit at once is dropped and counted (``dropped``): a stderr pipe nobody reads
    (``dispatcher run ... 2>&1 | slow``) must not stall the event loop, whose signal
    handlers and sessions wait behind it. After a write fails (closed pipe, full disk)
    everything is dropped. A stream without a descriptor is written to directly."""

    def __init__(self, stream: TextIO, *, limit: int = 1 << 20) -> None:
        self._stream = stream
        self.limit = limit
        self.dropped = 0  # lines
        self.broken = False
        self._partial: list[str] = []
        self._pending: deque[bytes] = deque()
        self._pending_bytes = 0
        self._writing = False
        self._lock = threading.Condition(threading.RLock())  # _queue takes it again
        self._thread: threading.Thread | None = None
        try:
            self._fd: int | None = stream.fileno()
        except (OSError, ValueError, AttributeError):
            self._fd = None
        try:
            self._tty = stream.isatty()
        except (OSError, ValueError, AttributeError):
            self._tty = False
        self.encoding = getattr(stream, "encoding", None) or "utf-8"

    def write(self, text: str) -> int:
        if self._fd is None:
            self._write_through(text)
            return len(text)
        end = text.rfind("\n")
        with self._lock:  # a log line may come from another thread (a compose thread, /metrics)
            if end < 0:
                self._partial.append(text)  # print() writes the text, then the newline
                return len(text)
            self._partial.append(text[:end + 1])
            line = "".join(self._partial)
            self._partial = [text[end + 1:]] if end + 1 < len(text) else []
            self._queue(line)
        return len(text)

    def flush(self) -> None:
        if self._fd is None:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self.broken = True
        else:
            with self._lock:
                if self._partial:
                    text, self._partial = "".join(self._partial), []
                    self._queue(text)

    def isatty(self) -> bool:
        return self._tty and not self.broken

    def fileno(self) -> int:
        return self._stream.fileno()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def finish(self, timeout: float = 1.0) -> None:
        """At the end of a command: wait up to ``timeout`` seconds for the lines still
        buffered, and say how many were dropped, if the stream can still take it."""
        self.flush()
        if self._fd is None or not self._wait(timeout):
            return
        if self.dropped and not self.broken:
            dropped, self.dropped = self.dropped, 0
            self._queue(f"dispatcher: {dropped} log line(s) dropped: standard error did not take them at once\n",
                        force=True)
            self._wait(timeout)

    def _write_through(self, text: str) -> None:
        if not self.broken:
            try:
                self._stream.write(text)
            except (OSError, ValueError):  # ValueError: the stream was closed
                self.broken = True

    def _queue(self, text: str, *, force: bool = False) -> None:
        data = text.encode(self.encoding, "backslashreplace")
        with self._lock:
            if self.broken:
                return
            if self._pending_bytes + len(data) > self.limit and not force:
                self.dropped += max(1, text.count("\n"))
                return
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._lock.notify()
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="dispatcher-stderr", daemon=True)
                self._thread.start()

    def _wait(self, timeout: float) -> bool:
        """Wait until the writer has written everything; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending or self._writing:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def _serve(self) -> None:
        assert self._fd is not None
        while True:
            with self._lock:
                while not self._pending:
                    self._writing = False
                    self._lock.notify_all()
                    self._lock.wait()
                data = b"".join(self._pending)
                self._pending.clear()
                self._pending_bytes = 0
                self._writing = True
            try:
                _write_fully(self._fd, data)
            except OSError:
                with self._lock:
                    self.broken = True
                    self._pending.clear()
                    self._pending_bytes = 0
                    self._writing = False
                    self._lock.notify_all()
                return


def _write_fully(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:  # a descriptor someone else made non-blocking
            select.select([], [fd], [])
        except InterruptedError:
            continue


class CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time of each write: while the live
    progress display (``dispatcher.observe.progress``) runs, that is rich's proxy, which prints
    each log line above the display instead of through it. On a terminal otherwise,
    a line is wrapped at a space to the terminal's width, as the proxy does (the
    terminal itself would cut the last line of a run, ``run.summary``, inside a word)."""

    def __init__(self) -> None:
        self._line: list[str] = []

    def write(self, text: str) -> int:
        stream = sys.stderr
        if isinstance(stream, FileProxy) or not stream.isatty():
            return stream.write(text)
        self._line.append(text)  # print() writes the line, then its newline
        if text.endswith("\n"):
            line, self._line = "".join(self._line), []
            console = Console(file=stream, soft_wrap=False, highlight=False, markup=False, emoji=False)
            console.print(Text.from_ansi(line[:-1]))
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


def protect_stderr() -> DroppingStream:
    """Make ``sys.stderr`` a ``DroppingStream`` (once) and return it."""
    if not isinstance(sys.stderr, DroppingStream):
        sys.stderr = DroppingStream(sys.stderr)
    return sys.stderr


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info if json_output else structlog.processors.StackInfoRenderer(),
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=cast(TextIO, CurrentStderr())),
        cache_logger_on_first_use=True,
    )
