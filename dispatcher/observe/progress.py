"""The live progress display of ``dispatcher run`` on a terminal, drawn with rich.

One or two lines at the bottom of the terminal, never wider than it (a line that
wraps would scroll a copy of itself on every redraw)::

    ━━━━━━━━━━━━━━━━━━━━━━━━━━╸━━━━━━━━━━━  42.1%  1,234 msg/s  ETA 0:01:23
    sent 12,345  failed 12  invalid 3  skipped 0

The share and the ETA come from the input bytes whose job has ended (the jobs file's
size is known before the first line is read); the rates are over the last
``WINDOW`` seconds, so that a resumed run racing through skipped lines does not
promise an ETA it cannot keep. While the display is live, ``sys.stderr`` goes through
rich's console (log lines and messages are printed above the display, never through
it); ``dispatcher.observe.logs`` writes structlog's lines to whatever ``sys.stderr`` is.
"""

from __future__ import annotations

import sys
import time
from collections import deque
from collections.abc import Mapping
from types import TracebackType
from typing import Protocol

from rich.console import Console, ConsoleOptions, RenderResult
from rich.live import Live
from rich.text import Text

WINDOW = 10.0  # seconds of history behind the rates and the ETA
MIN_BAR = 10  # cells: below this the bar goes, the numbers stay
SPARE_CELLS = 3  # never drawn: room for the terminal's "^C" and its deferred wrap


class Tally(Protocol):
    """What the run counts (``dispatcher.batch.runner.Tally``)."""

    @property
    def counts(self) -> Mapping[str, int]: ...
    @property
    def bytes_done(self) -> int: ...  # bytes of the lines whose job has ended
    @property
    def bytes_total(self) -> int | None: ...  # the jobs file's size; None when unknown (standard input, a pipe)
    @property
    def started(self) -> float: ...  # time.monotonic() at the start of the run


class Speed:
    """Messages and input bytes per second over the last ``window`` seconds."""

    def __init__(self, window: float = WINDOW) -> None:
        self.window = window
        self._samples: deque[tuple[float, int, int]] = deque()  # (time, messages done, bytes done)

    def sample(self, now: float, messages: int, bytes_done: int) -> tuple[float, float]:
        """Record the counts at ``now``; returns (messages/s, bytes/s) over the window."""
        samples = self._samples
        samples.append((now, messages, bytes_done))
        while len(samples) > 2 and samples[1][0] <= now - self.window:
            samples.popleft()  # keep one sample at or before the window's start
        then, messages_then, bytes_then = samples[0]
        elapsed = now - then
        if elapsed <= 0:
            return 0.0, 0.0
        return (messages - messages_then) / elapsed, (bytes_done - bytes_then) / elapsed


def progress_fields(tally: Tally, speed: Speed, now: float | None = None) -> dict[str, float | None]:
    """What a ``run.progress`` log line says besides the counts: ``rate`` (messages/s
    over ``speed``'s window) and, when the jobs file's size is known, ``share`` (0-1,
    of its bytes whose jobs have ended) and ``eta_s`` (None while nothing moves)."""
    counts = tally.counts
    message_rate, byte_rate = speed.sample(time.monotonic() if now is None else now,
                                           counts["sent"] + counts["failed"], tally.bytes_done)
    fields: dict[str, float | None] = {"rate": round(message_rate, 1)}
    if tally.bytes_total:
        fields["share"] = round(min(1.0, tally.bytes_done / tally.bytes_total), 4)
        left = max(0, tally.bytes_total - tally.bytes_done)
        fields["eta_s"] = round(left / byte_rate) if byte_rate > 0 else None
    return fields


class ProgressView:
    """The display as a rich renderable, laid out for the width rich gives it."""

    def __init__(self, tally: Tally) -> None:
        self.tally = tally
        self.finished = False  # the last render: elapsed time instead of an ETA
        self._speed = Speed()
        self._rates = (0.0, 0.0)

    def sample(self, now: float | None = None) -> None:
        """Take the counts now (between two renders)."""
        counts = self.tally.counts
        self._rates = self._speed.sample(time.monotonic() if now is None else now,
                                         counts["sent"] + counts["failed"], self.tally.bytes_done)

    def lines(self, width: int) -> list[Text]:
        """The display in lines of at most ``width`` cells."""
        t, c = self.tally, self.tally.counts
        message_rate, byte_rate = self._rates
        counts = Text.assemble(
            "sent ", (f"{c['sent']:,}", "green"), "  failed ", (f"{c['failed']:,}", "red" if c["failed"] else ""),
            "  invalid ", (f"{c['invalid']:,}", "yellow" if c["invalid"] else ""),
            "  skipped ", (f"{c['skipped']:,}", "dim"))
        speed = f"{message_rate:,.0f} msg/s"
        if self.finished:
            when = f"in {_duration(time.monotonic() - t.started)}"
        elif t.bytes_total and byte_rate > 0:
            when = f"ETA {_duration(max(0, t.bytes_total - t.bytes_done) / byte_rate)}"
        else:
            when = "ETA --:--"
        if not t.bytes_total:  # nothing to measure progress against: no bar, no ETA
            when = f"in {_duration(time.monotonic() - t.started)}"
            return [_fit(Text.assemble(counts, "  ", speed, "  ", when), width)]
        share = min(1.0, t.bytes_done / t.bytes_total)
        stats = Text(f"{share:6.1%}  {speed}  {when}")
        one_line = Text.assemble(stats, "  ", counts)
        if width - one_line.cell_len - 1 >= 2 * MIN_BAR:
            return [Text.assemble(_bar(share, width - one_line.cell_len - 1), " ", one_line)]
        if width - stats.cell_len - 1 >= MIN_BAR:
            return [Text.assemble(_bar(share, width - stats.cell_len - 1), " ", stats), _fit(counts, width)]
        return [_fit(stats, width), _fit(counts, width)]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        # Cells spare at the end: a line that fills the last column wraps on terminals
        # without deferred wrapping, and the terminal echoes a typed Ctrl-C as "^C" at
        # the cursor, the end of the last line. Either would make the display one row
        # taller than rich knows, and its redraw would leave a frozen copy behind.
        yield from self.lines(max(1, options.max_width - SPARE_CELLS))


class LiveDisplay:
    """The display, live on ``sys.stderr`` between ``start()`` and ``stop()``.

    ``refresh()`` redraws it (the caller's clock: no thread of rich's own). While it
    is live, ``sys.stderr`` is rich's proxy, which prints each line above the display.
    ``force`` draws it even when stderr is no terminal (``--progress``)."""

    def __init__(self, tally: Tally, *, force: bool = False) -> None:
        self.view = ProgressView(tally)
        self.console = Console(file=sys.stderr, force_terminal=True if force else None, highlight=False,
                               soft_wrap=False)
        self._live = Live(self.view, console=self.console, auto_refresh=False, transient=False,
                          redirect_stdout=False, redirect_stderr=True)

    def start(self) -> None:
        self.view.sample()
        self._live.start(refresh=True)

    def refresh(self) -> None:
        self.view.sample()
        self._live.refresh()

    def stop(self) -> None:
        """Draw the last state and give the terminal back (stderr unredirected)."""
        self.view.sample()
        self.view.finished = True
        self._live.stop()

    def __enter__(self) -> LiveDisplay:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _bar(share: float, width: int) -> Text:
    """``width`` cells, in halves: rich's own bar glyphs."""
    halves = int(share * width * 2)
    full, half = divmod(halves, 2)
    bar = Text("━" * full, style="bar.finished" if share >= 1 else "bar.complete")
    if half:
        bar.append("╸", style="bar.complete")
    rest = width - full - half
    if rest > 0:
        bar.append("━" * rest, style="bar.back")
    return bar


def _fit(text: Text, width: int) -> Text:
    text.no_wrap = True
    text.truncate(width, overflow="ellipsis")
    return text


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    if seconds >= 100 * 3600:
        return f"{seconds // 86400}d"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
