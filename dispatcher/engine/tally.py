"""What the engine counts, read by the progress display and the metrics."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STATUSES = ("sent", "failed", "invalid", "suppressed", "skipped")


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
