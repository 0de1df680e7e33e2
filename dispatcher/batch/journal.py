"""The results file: append-only JSON Lines that make re-runs safe.

Each finished job is one line, written with a single ``write`` on an ``O_APPEND``
descriptor, so a killed run leaves whole lines (at worst a torn last line, which the
next run ignores and newline-terminates). The file is fsynced at most once a second
and when the run ends. Only one run at a time may use a results file: ``open`` takes
an exclusive ``flock`` and fails at once when another run holds it.

Which lines are done is decided by key: a row with an ``id`` marks that id done; a
row with ``"id": null`` (a line whose id could not be read, or the duplicate of an
earlier line's id) marks only its line number done, so a duplicate never hides the
id's first line and an unreadable line is not recorded again on every re-run.
"""

from __future__ import annotations

import enum
import errno
import fcntl
import hashlib
import json
import os
import stat
import struct
import sys
import tempfile
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

DONE_STATUSES = frozenset({"sent", "failed", "invalid", "suppressed"})
FSYNC_INTERVAL = 1.0


class JournalBusy(Exception):
    """Another run holds the results file's lock."""


class TempFileError(OSError):
    """The temporary file of the job ids seen in this run cannot be written (a full
    TMPDIR): ``strerror`` says so in one line."""


def _digest(key: bytes) -> int:
    """64 bits of the interpreter's keyed hash (SipHash, seeded at random for each run
    unless PYTHONHASHSEED fixes it, so no one can choose ids that collide; 0.1 µs where
    BLAKE2b takes 0.6). Digests are never written anywhere, and a forked compose
    process shares the seed. Tests replace it to force collisions."""
    return hash(key) & _MASK


def _blake2b_digest(key: bytes) -> int:
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big")


_MASK = (1 << 64) - 1
if sys.hash_info.width < 64:  # a 32-bit build: its hashes would fill only the low slots
    _digest = _blake2b_digest


def id_key(job_id: str) -> bytes:
    return b"i" + job_id.encode("utf-8", "surrogatepass")


def line_key(number: int) -> bytes:
    return b"l" + str(number).encode("ascii")


class KeyIndex:
    """A map of keys (bytes) to locations (ints < 2**36), 8 bytes a slot, keys not held.

    A slot keeps the top 28 bits of the key's digest and where the key can be read
    back: ``resolve(location)`` returns the key stored there. A lookup confirms every
    digest match by reading the key back, so two keys that share a digest are never
    taken for one another; it only costs a read. Linear probing, at most half full:
    16 to 32 bytes per key (8-byte slots, a half to a quarter of them used). The home
    slot is taken from the stored bits, so the table grows without reading keys back,
    up to 2**28 slots (134 million keys).
    """

    HASH_BITS = 28
    LOCATION_BITS = 36
    MAX_LOCATION = (1 << LOCATION_BITS) - 2

    __slots__ = ("_bits", "_count", "_resolve", "_table")

    def __init__(self, resolve: Callable[[int], bytes | None], capacity: int = 1 << 12) -> None:
        self._bits = min(self.HASH_BITS, max(4, (capacity * 2 - 1).bit_length()))
        self._table = array("Q", bytes(8 << self._bits))
        self._count = 0
        self._resolve = resolve

    def __len__(self) -> int:
        return self._count

    def get(self, key: bytes) -> int | None:
        """The location stored for ``key``, or None."""
        return self._find(key, _digest(key) >> (64 - self.HASH_BITS))[1]

    def put(self, key: bytes, location: int) -> None:
        """Store ``location`` for ``key`` (replacing the one it had)."""
        self._store(key, location, replace=True)

    def add(self, key: bytes, location: int) -> bool:
        """Store ``location`` for ``key`` unless it has one; return True if it was added."""
        return self._store(key, location, replace=False)

    def _store(self, key: bytes, location: int, *, replace: bool) -> bool:
        slot, high, found = self.find(key)
        if found is not None and not replace:
            return False
        self.store(slot, high, location, added=found is None)
        return found is None

    def find(self, key: bytes) -> tuple[int, int, int | None]:
        """(slot, digest bits, location or None) for ``store``: the table has room for
        one more key when this returns, so the slot stays valid until ``store``."""
        if (self._count + 1) * 2 > len(self._table):
            self._grow()
        high = _digest(key) >> (64 - self.HASH_BITS)
        slot, found = self._find(key, high)
        return slot, high, found

    def store(self, slot: int, high: int, location: int, *, added: bool) -> None:
        """Set the slot ``find`` returned (no lookup in between)."""
        if not 0 <= location <= self.MAX_LOCATION:
            raise OverflowError(f"location {location} is beyond the index's {self.LOCATION_BITS} bits")
        self._count += added
        self._table[slot] = (high << self.LOCATION_BITS) | (location + 1)

    def _find(self, key: bytes, high: int) -> tuple[int, int | None]:
        """(slot, location) of ``key``, or (the empty slot where it would go, None)."""
        table, mask = self._table, len(self._table) - 1
        slot = high >> (self.HASH_BITS - self._bits)
        shift, low = self.LOCATION_BITS, (1 << self.LOCATION_BITS) - 1
        while entry := table[slot]:
            if entry >> shift == high and self._resolve((entry & low) - 1) == key:
                return slot, (entry & low) - 1
            slot = (slot + 1) & mask
        return slot, None

    def _grow(self) -> None:
        if self._bits >= self.HASH_BITS:
            raise OverflowError(f"more than {1 << (self.HASH_BITS - 1)} keys in one index")
        old = self._table
        self._bits += 1
        self._table = table = array("Q", bytes(8 << self._bits))
        mask, down = len(table) - 1, self.LOCATION_BITS + self.HASH_BITS - self._bits
        for entry in old:
            if entry:
                slot = entry >> down
                while table[slot]:
                    slot = (slot + 1) & mask
                table[slot] = entry


class _Spill:
    """Append-only records of (key, line) in an unlinked temporary file: the keys an
    index points to that exist nowhere else (ids first seen in this run, read from a
    stream). The last MiB is kept in memory; a record's location is its offset."""

    FLUSH_AT = 1 << 20
    _HEAD = struct.Struct("<IQ")

    def __init__(self) -> None:
        self._pending = bytearray()
        self._flushed = 0  # bytes already in the file
        self._fd = -1

    def append(self, key: bytes, line: int) -> int:
        offset = self._flushed + len(self._pending)
        self._pending += self._HEAD.pack(len(key), line) + key
        if len(self._pending) >= self.FLUSH_AT:
            self._flush()
        return offset

    def read(self, offset: int) -> tuple[bytes, int]:
        size = self._HEAD.size
        if offset >= self._flushed:
            start = offset - self._flushed
            length, line = self._HEAD.unpack_from(self._pending, start)
            return bytes(self._pending[start + size:start + size + length]), line
        # A flush writes whole records: a record is all in the file or all in memory.
        length, line = self._HEAD.unpack(os.pread(self._fd, size, offset))
        return os.pread(self._fd, length, offset + size), line

    def _flush(self) -> None:
        where = os.environ.get("TMPDIR") or tempfile.gettempdir()  # TMPDIR itself, never a fallback
        try:
            if self._fd < 0:
                fd, name = tempfile.mkstemp(prefix="dispatcher-ids-", dir=where)
                os.unlink(name)
                self._fd = fd
            _write_all(self._fd, self._pending)
        except OSError as exc:
            raise TempFileError(exc.errno, f"cannot write the job ids' temporary file in {where}: "
                                f"{exc.strerror or exc} (it needs about 21 bytes per job id; "
                                "TMPDIR names the directory)") from exc
        self._flushed += len(self._pending)
        self._pending = bytearray()

    @property
    def closed(self) -> bool:
        return self._fd < 0 and self._flushed > 0

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class IdSet:
    """A set of job ids that keeps 16-32 bytes per id in memory (``KeyIndex``) and the
    ids themselves in a temporary file, so a digest collision is detected, never
    taken for a duplicate."""

    def __init__(self, capacity: int = 1 << 12) -> None:
        self._spill = _Spill()
        self._index = KeyIndex(lambda location: self._spill.read(location)[0], capacity)

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, job_id: object) -> bool:
        return isinstance(job_id, str) and self._index.get(id_key(job_id)) is not None

    def add(self, job_id: str) -> bool:
        """Add ``job_id``; return False if it was already there."""
        key = id_key(job_id)
        if self._index.get(key) is not None:
            return False
        self._index.put(key, self._spill.append(key, 0))
        return True


class Claim(enum.Enum):
    NEW = "new"  # first seen: this line owns the id
    DONE = "done"  # recorded by an earlier run: skip the line
    DUPLICATE = "duplicate"  # an earlier line of this run owns the id


def default_results_path(jobs: str) -> Path:
    path = Path(jobs)
    if path.name.endswith(".jsonl"):
        return path.with_name(path.name[: -len(".jsonl")] + ".results.jsonl")
    return path.with_name(path.name + ".results.jsonl")


def encode_result(result: dict[str, Any]) -> bytes:
    """One results line. Text the server or the jobs file gave may hold lone
    surrogates (a reply decoded with ``surrogateescape``, an id written ``"\\ud800"``),
    which UTF-8 cannot encode: such a line is written with ASCII escapes instead, which
    ``json.loads`` reads back to the very same strings, so ids still match on resume."""
    try:
        return orjson.dumps(result, option=orjson.OPT_APPEND_NEWLINE)  # json.dumps's bytes, 5x faster
    except TypeError:  # a lone surrogate (orjson.JSONEncodeError), or a value orjson does not know
        pass
    try:
        return json.dumps(result, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n"
    except UnicodeEncodeError:
        return json.dumps(result, ensure_ascii=True, separators=(",", ":")).encode("ascii") + b"\n"


def _write_all(fd: int, data: bytes | bytearray) -> None:
    """Append ``data`` whole, or not at all: a write that fails part-way (a disk that
    fills up after a short write) is cut back off, so no torn line stays behind."""
    done = os.write(fd, data)  # nothing written yet if it raises
    if done == len(data):
        return
    view = memoryview(data)
    while done < len(view):  # one write in practice; a short write is completed
        try:
            done += os.write(fd, view[done:])
        except OSError:
            if done:
                try:
                    os.ftruncate(fd, os.fstat(fd).st_size - done)
                except OSError:
                    pass  # the next run ignores a torn last line anyway
            raise


class Journal:
    """Appends results; knows which ids and lines a previous run already finished, and
    which ids this run has seen (``claim``).

    Memory: one ``KeyIndex`` for both, 16-32 bytes per id (plus 16-32 per line recorded
    without an id). The index confirms a digest match by re-reading the key: from the
    results file (ids of earlier runs, by offset) or from a temporary file holding the
    ids first seen in this run (about 13 bytes plus the id's length each).
    """

    def __init__(self, path: Path, *, retry_failed: bool = False) -> None:
        self.path = path
        # --retry-failed: id -> (state of the recipients not listed, state of those listed),
        # kept only for ids with a recipient to send again.
        self._retry: dict[str, tuple[int, dict[str, int]]] | None = {} if retry_failed else None
        self._unsent: set[int] = set()  # digests of keys whose last earlier row was failed or invalid
        self.resumed = 0  # rows of earlier runs that mark an id or a line done
        self._line_keys = 0
        self._base = KeyIndex.MAX_LOCATION + 1  # below: offsets in the results file; from it: the spill
        self._spill = _Spill()
        self._index = KeyIndex(self._resolve)
        self._fd = -1
        self._reader = -1
        self.created = False  # by this run's open
        self.recorded = 0  # rows written by this run
        self._broken: OSError | None = None
        self._last_sync = 0.0
        self._dirty = False

    @property
    def done(self) -> _DoneIds:
        """The ids an earlier run recorded (``job_id in journal.done``)."""
        return _DoneIds(self)

    def open(self) -> None:
        """Lock the file, load the resume index, then open for appending.

        Raises JournalBusy when another run holds the lock, OSError when the file
        cannot be read or created."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.created = not self.path.exists()
        # Non-blocking: a FIFO in its place must not block the open (it is refused below).
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NONBLOCK, 0o644)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise OSError(errno.EINVAL, "not a regular file")
            os.set_blocking(fd, True)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalBusy(f"{self.path}: another dispatcher run is using this results file") from None
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        try:
            self._reader = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            torn = self._load()
            if torn:
                os.write(self._fd, b"\n")
        except BaseException:
            self.close()
            raise
        self._last_sync = time.monotonic()

    def _load(self) -> bool:
        """Index every done row; return True when the last line is torn."""
        offset, torn = 0, False
        with open(self._reader, "rb", closefd=False) as existing:
            for raw in existing:
                torn = not raw.endswith(b"\n")
                row = _row(raw) if not torn else None
                key = _key_of(row) if row is not None else None
                if row is not None and self._retry is not None:
                    self._fold_retry(row)
                if key is not None:  # the last row of a key says whether it was sent
                    if row is not None and row.get("status") not in ("sent", "suppressed"):
                        self._unsent.add(_digest(key))
                    elif self._unsent:
                        self._unsent.discard(_digest(key))
                if key is not None and self._index.add(key, offset):
                    self.resumed += 1
                    self._line_keys += key.startswith(b"l")
                offset += len(raw)
        self._base = offset
        return torn

    def _resolve(self, location: int) -> bytes | None:
        if location >= self._base:
            return self._spill.read(location - self._base)[0] if not self._spill.closed else None
        if self._reader < 0:  # closed: ``done`` may still be asked
            with self.path.open("rb") as file:
                file.seek(location)
                return _row_key(file.readline())
        chunk = os.pread(self._reader, 4096, location)
        if chunk.startswith(_ID_FIRST):
            # Rows start with the id: read just that string (the row was checked when it
            # was indexed, and the file only grows).
            start = len(_ID_FIRST) + (chunk[len(_ID_FIRST)] == 32)  # '{"id": "' too
            if chunk[start:start + 1] == b'"':
                try:
                    job_id, _ = _scanstring(chunk[:1024].decode("utf-8", "surrogateescape"), start + 1)
                except ValueError:
                    pass  # longer than the chunk: read the whole row
                else:
                    return id_key(job_id)
        while b"\n" not in chunk:
            more = os.pread(self._reader, 65536, location + len(chunk))
            if not more:
                return None
            chunk += more
        return _row_key(chunk[: chunk.index(b"\n")])

    def _fold_retry(self, row: dict[str, Any]) -> None:
        """Fold one row into the per-recipient state of its id (``--retry-failed``)."""
        assert self._retry is not None
        job_id = row.get("id")
        if not isinstance(job_id, str):
            return
        rest, listed = _recipient_states(row)
        covered = row.get("recipients")
        if isinstance(covered, list):  # a retry row: it speaks for these recipients only
            if job_id not in self._retry:
                return
            _, old_listed = self._retry[job_id]
            for rcpt in covered:
                if isinstance(rcpt, str):
                    old_listed[rcpt] = listed.get(rcpt, rest)
            # The retry covered every recipient left to send: any other one is final.
            rest, listed = ACCEPTED, old_listed
        if rest == TRANSIENT or TRANSIENT in listed.values():
            self._retry[job_id] = (rest, listed)
        else:
            self._retry.pop(job_id, None)

    def may_retry(self, job_id: str) -> bool:
        """An earlier run left a recipient of ``job_id`` to send again (``--retry-failed``)."""
        return self._retry is not None and job_id in self._retry

    def to_retry(self, job_id: str, recipients: list[str]) -> list[str]:
        """Of the job's envelope ``recipients``, those whose last result was a transient
        refusal or give-up (4xx, lost connection, timeout); never one that was accepted
        or refused permanently."""
        if self._retry is None or job_id not in self._retry:
            return []
        rest, listed = self._retry[job_id]
        return [rcpt for rcpt in recipients if listed.get(rcpt, rest) == TRANSIENT]

    def unsent_before(self, job_id: str | None, number: int) -> bool:
        """The last result an earlier run recorded for this id (or, without one, for
        this line) was ``failed`` or ``invalid``: skipping it now is no success (exit 1).
        Kept as 8-byte digests of those keys only; a digest collision can only turn an
        exit 0 into 1, never skip or send a job."""
        if not self._unsent:
            return False
        return _digest(id_key(job_id) if job_id is not None else line_key(number)) in self._unsent

    def done_earlier(self, job_id: str) -> bool:
        """An earlier run recorded ``job_id``, and ``--retry-failed`` leaves none of its
        recipients to send: a line with it needs no composing. Reads only (the index as
        loaded, the results file through its own descriptor), so a forked compose
        process may ask it too."""
        if self.resumed == self._line_keys:  # no earlier row names an id (a new results file)
            return False
        location = self._index.get(id_key(job_id))
        return location is not None and location < self._base and not self.may_retry(job_id)

    def reader_fd(self) -> int:
        """The results file's read-only descriptor (it holds no lock)."""
        return self._reader

    def line_done(self, number: int) -> bool:
        """An earlier run recorded line ``number`` without an id."""
        return self._line_keys > 0 and self._index.get(line_key(number)) is not None

    def claim(self, job_id: str, line: int) -> tuple[Claim, int]:
        """Line ``line`` carries ``job_id``: NEW (it owns the id now), DONE (an earlier
        run recorded the id; the line now owns it) or DUPLICATE (an earlier line of
        this run owns it). Also returns the owning line (for DUPLICATE)."""
        key = id_key(job_id)
        slot, high, location = self._index.find(key)
        if location is not None and location >= self._base:
            return Claim.DUPLICATE, self._spill.read(location - self._base)[1]
        self._index.store(slot, high, self._base + self._spill.append(key, line), added=location is None)
        return (Claim.NEW if location is None else Claim.DONE), line

    def record(self, result: dict[str, Any]) -> None:
        """Append one result. Raises OSError when the file cannot be written; after
        that every later call raises it too (a torn line is never followed by more)."""
        if self._broken is not None:
            raise self._broken
        try:
            _write_all(self._fd, encode_result(result))
            self.recorded += 1
            self._dirty = True
            now = time.monotonic()
            if now - self._last_sync >= FSYNC_INTERVAL:
                self.sync(now)
        except OSError as exc:
            self._broken = exc
            raise

    def sync(self, now: float | None = None) -> None:
        if self._fd >= 0 and self._dirty:
            os.fsync(self._fd)
            self._dirty = False
        self._last_sync = now if now is not None else time.monotonic()

    def close(self, *, discard_unused: bool = False) -> None:
        """Fsync and close (which releases the lock). Raises OSError if the fsync fails.
        ``discard_unused``: remove the file when this run created it and wrote nothing."""
        if discard_unused and self.created and not self.recorded and self._fd >= 0:
            try:
                os.unlink(self.path)  # under the lock: no other run is using it
            except OSError:
                pass
        try:
            if self._fd >= 0 and self._broken is None:
                self.sync()
        finally:
            for fd in (self._fd, self._reader):
                if fd >= 0:
                    os.close(fd)
            self._fd = self._reader = -1
            self._spill.close()


class _DoneIds:
    __slots__ = ("_journal",)

    def __init__(self, journal: Journal) -> None:
        self._journal = journal

    def __contains__(self, job_id: object) -> bool:
        if not isinstance(job_id, str):
            return False
        location = self._journal._index.get(id_key(job_id))
        return location is not None and location < self._journal._base

    def __len__(self) -> int:
        return self._journal.resumed


ACCEPTED, PERMANENT, TRANSIENT = 0, 1, 2
_ID_FIRST = b'{"id":'
_scanstring: Callable[[str, int], tuple[str, int]] = json.decoder.scanstring  # type: ignore[attr-defined]


def _recipient_states(row: dict[str, Any]) -> tuple[int, dict[str, int]]:
    """(state of the recipients the row does not list, state of each it lists in ``refused``)."""
    def state(code: Any) -> int:
        return PERMANENT if isinstance(code, int) and 500 <= code < 600 else TRANSIENT

    status = row.get("status")
    listed: dict[str, int] = {}
    refused = row.get("refused")
    if isinstance(refused, dict) and status != "invalid":
        for rcpt, reply in refused.items():
            listed[rcpt] = state(reply[0] if isinstance(reply, list) and reply else None)
    if status == "sent":
        rest = ACCEPTED
    elif status == "failed":
        rest = state(row.get("code"))  # no recipient accepted: 5xx is final, 4xx / no reply is not
    else:
        rest = PERMANENT  # invalid: nothing to send again until the line is fixed
    return rest, listed


def _row(raw: bytes) -> dict[str, Any] | None:
    """A done results row, or None (torn, not a result, not done)."""
    try:
        row = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(row, dict) or row.get("status") not in DONE_STATUSES:
        return None
    return row


def _row_key(raw: bytes) -> bytes | None:
    """The key a results line marks done, or None."""
    row = _row(raw)
    return _key_of(row) if row is not None else None


def _key_of(row: dict[str, Any]) -> bytes | None:
    job_id, line = row.get("id"), row.get("line")
    if isinstance(job_id, str):
        return id_key(job_id)
    if job_id is None and isinstance(line, int) and not isinstance(line, bool):
        return line_key(line)
    return None


