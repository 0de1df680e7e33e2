"""The results file: append-only JSON Lines that make re-runs safe.

Each finished job is one line, written with a single ``write`` on an ``O_APPEND``
descriptor, so a killed run leaves whole lines (at worst a torn last line, which the
next run ignores and newline-terminates). The file is fsynced at most once a second
and when the run ends. On start, every id already recorded is loaded into an
``IdSet`` so that it is skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from array import array
from pathlib import Path
from typing import Any

DONE_STATUSES = frozenset({"sent", "failed", "invalid"})
FSYNC_INTERVAL = 1.0


class IdSet:
    """A set of job ids in 8 bytes each: 64-bit BLAKE2b digests in an open-addressing
    table. A million ids take 16 MB where a set of str would take ~80 MB.

    Two different ids share a digest with probability about n²/2⁶⁵ (3·10⁻⁸ for a
    million ids); such an id would be taken for a duplicate.
    """

    __slots__ = ("_table", "_mask", "_count")

    def __init__(self, capacity: int = 1 << 12) -> None:
        size = 1 << max(4, (capacity * 2 - 1).bit_length())
        self._table = array("Q", bytes(8 * size))
        self._mask = size - 1
        self._count = 0

    def __len__(self) -> int:
        return self._count

    @staticmethod
    def _key(job_id: str) -> int:
        digest = hashlib.blake2b(job_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()
        return int.from_bytes(digest, "little") | 1  # 0 marks an empty slot

    def __contains__(self, job_id: object) -> bool:
        if not isinstance(job_id, str):
            return False
        key = self._key(job_id)
        return self._table[self._slot(key)] == key

    def add(self, job_id: str) -> bool:
        """Add ``job_id``; return False if it was already there."""
        if (self._count + 1) * 2 > len(self._table):
            self._grow()
        return self._insert(self._key(job_id))

    def _slot(self, key: int) -> int:
        """Where ``key`` is, or the empty slot where it would go (linear probing)."""
        table, mask = self._table, self._mask
        slot = key & mask
        while table[slot] != key and table[slot] != 0:
            slot = (slot + 1) & mask
        return slot

    def _insert(self, key: int) -> bool:
        slot = self._slot(key)
        if self._table[slot] == key:
            return False
        self._table[slot] = key
        self._count += 1
        return True

    def _grow(self) -> None:
        old = self._table
        self._table = array("Q", bytes(16 * len(old)))
        self._mask = len(self._table) - 1
        self._count = 0
        for key in old:
            if key:
                self._insert(key)


def default_results_path(jobs: str) -> Path:
    path = Path(jobs)
    if path.name.endswith(".jsonl"):
        return path.with_name(path.name[: -len(".jsonl")] + ".results.jsonl")
    return path.with_name(path.name + ".results.jsonl")


class Journal:
    """Appends results; knows which ids a previous run already finished."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.done = IdSet()
        self._fd = -1
        self._last_sync = 0.0
        self._dirty = False

    def open(self) -> None:
        """Load the resume index, then open for appending. Raises OSError."""
        torn = False
        if self.path.exists():
            with self.path.open("rb") as existing:
                for raw in existing:
                    torn = not raw.endswith(b"\n")
                    try:
                        record = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        continue  # a line torn by a crash: its job was not finished
                    if isinstance(record, dict) and record.get("status") in DONE_STATUSES:
                        job_id = record.get("id")
                        if isinstance(job_id, str):
                            self.done.add(job_id)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        if torn:
            os.write(self._fd, b"\n")
        self._last_sync = time.monotonic()

    def record(self, result: dict[str, Any]) -> None:
        line = json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
        view = memoryview(line)
        while view:  # one write in practice; a short write is completed, never torn
            written = os.write(self._fd, view)
            view = view[written:]
        self._dirty = True
        now = time.monotonic()
        if now - self._last_sync >= FSYNC_INTERVAL:
            self.sync(now)

    def sync(self, now: float | None = None) -> None:
        if self._fd >= 0 and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = now if now is not None else time.monotonic()

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
