"""The suppression list: addresses never to be mailed again, and why.

One record per address, compared case-insensitively: ``{address, reason, source,
job_id, detail, at}``. The store is one SQLite file (``suppression.path``) in WAL
mode, so that ``run``, ``bounces``, ``suppress`` and the unsubscribe server can use it
at the same time on one machine: readers never wait for a writer, and writers wait
for each other (``busy_timeout``) instead of failing.

A run reads the whole list once into memory (:class:`Admission`) and reloads it only
when another process has changed the file (SQLite's ``data_version``), so that a
recipient costs one dictionary lookup whatever the size of the list.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol

import structlog
from prometheus_client import CollectorRegistry, Counter

from dispatcher.compose.address import parse_address
from dispatcher.loop.settings import SuppressionSettings

log = structlog.get_logger("dispatcher.suppression")

REFRESH_EVERY = 2.0  # seconds between checks for changes made by other processes
_CHUNK = 500  # addresses per IN (...) query: well under SQLite's 32,766 variables


class Reason(StrEnum):
    HARD_BOUNCE = "hard_bounce"
    COMPLAINT = "complaint"
    UNSUBSCRIBE = "unsubscribe"
    MANUAL = "manual"


def now() -> str:
    """The time of a record: ISO 8601, UTC, seconds."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def key_of(address: str) -> str:
    """The address as the list compares it: as the envelope carries it (a Unicode domain
    in IDNA, ``ada@bücher.example`` as ``ada@xn--bcher-kva.example``), case-insensitively,
    without surrounding space. A string that is no valid address is compared as given."""
    address = address.strip()
    try:
        address = parse_address(address).address
    except ValueError:
        pass
    return address.lower()


@dataclass(frozen=True, slots=True)
class Record:
    address: str
    reason: Reason
    source: str  # who suppressed it: "run", "bounces:PATH", "unsubscribe-server", "suppress add"...
    job_id: str | None = None
    detail: str | None = None  # the refusal, the DSN's diagnostic, the complaint's feedback type
    at: str = field(default_factory=now)

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["reason"] = str(self.reason)
        return row


_SCHEMA = """
CREATE TABLE IF NOT EXISTS suppressions (
    key TEXT PRIMARY KEY,       -- the address, lower case
    address TEXT NOT NULL,      -- as first given
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    job_id TEXT,
    detail TEXT,
    at TEXT NOT NULL
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS suppressions_reason ON suppressions (reason);
"""
_COLUMNS = "address, reason, source, job_id, detail, at"


class StoreError(Exception):
    """The store cannot be used (not a database, no permission): one line naming the file."""


class SuppressionStore:
    """The SQLite store at ``path``. Thread-safe: one connection, one lock; call the
    methods from a thread (``asyncio.to_thread``) when on an event loop, since a
    write may wait for another process's. The file is created by the first write; until
    then every read finds an empty list."""

    def __init__(self, path: Path, *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self._busy_timeout = busy_timeout
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._version: int | None = None

    def __repr__(self) -> str:
        return f"<SuppressionStore {self.path} {'open' if self._db is not None else 'closed'}>"

    def _connect(self, *, create: bool) -> sqlite3.Connection | None:
        if self._db is not None:
            return self._db
        if not create and not self.path.exists():
            return None
        try:
            db = sqlite3.connect(self.path, timeout=self._busy_timeout, isolation_level=None,
                                 check_same_thread=False)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: cannot open the suppression list: {exc}") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")  # WAL: a commit is durable at the next checkpoint
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"{self.path}: not a usable suppression list: {exc}") from None
        self._db = db
        return db

    def close(self) -> None:
        """Close the connection (the next call opens another)."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
                self._version = None  # data_version is per connection: nothing to compare with now

    def add(self, records: Iterable[Record]) -> list[Record]:
        """Add each record whose address is not listed yet (an address keeps its first
        record: the reason it was first suppressed). Returns the records added."""
        added: list[Record] = []
        with self._lock:
            db = self._connect(create=True)
            assert db is not None
            try:
                db.execute("BEGIN IMMEDIATE")
                for r in records:
                    cursor = db.execute(
                        "INSERT INTO suppressions (key, address, reason, source, job_id, detail, at) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (key) DO NOTHING",
                        (key_of(r.address), r.address.strip(), str(r.reason), r.source, r.job_id, r.detail, r.at))
                    if cursor.rowcount:
                        added.append(r)
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return added

    def remove(self, addresses: Iterable[str]) -> int:
        """Take ``addresses`` off the list; returns how many were on it."""
        with self._lock:
            db = self._connect(create=False)
            if db is None:
                return 0
            removed = 0
            db.execute("BEGIN IMMEDIATE")
            try:
                for address in addresses:
                    removed += db.execute("DELETE FROM suppressions WHERE key = ?", (key_of(address),)).rowcount
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            return removed

    def find(self, addresses: Sequence[str]) -> dict[str, Record]:
        """The records of those of ``addresses`` that are listed, by lower-case address."""
        found: dict[str, Record] = {}
        keys = list(dict.fromkeys(key_of(a) for a in addresses))
        with self._lock:
            db = self._connect(create=False)
            if db is None:
                return found
            for start in range(0, len(keys), _CHUNK):
                chunk = keys[start:start + _CHUNK]
                marks = ",".join("?" * len(chunk))
                for row in db.execute(f"SELECT key, {_COLUMNS} FROM suppressions WHERE key IN ({marks})", chunk):
                    found[row[0]] = _record(row[1:])
        return found

    def records(self, reason: Reason | None = None) -> Iterator[Record]:
        """Every record (of ``reason``), oldest first. Reads a snapshot in pages, so a
        long export neither holds the lock nor the whole list in memory."""
        last = ("", "")
        while True:
            with self._lock:
                db = self._connect(create=False)
                if db is None:
                    return
                where = "(at, key) > (?, ?)" + (" AND reason = ?" if reason is not None else "")
                args: tuple[str, ...] = (*last, str(reason)) if reason is not None else last
                rows = db.execute(f"SELECT at, key, {_COLUMNS} FROM suppressions WHERE {where} "
                                  "ORDER BY at, key LIMIT 1000", args).fetchall()
            if not rows:
                return
            for row in rows:
                yield _record(row[2:])
            last = (rows[-1][0], rows[-1][1])

    def reasons(self) -> dict[str, Reason]:
        """Every listed address (lower case) with its reason: what a run keeps in memory."""
        with self._lock:
            db = self._connect(create=False)
            if db is None:
                return {}
            self._version = db.execute("PRAGMA data_version").fetchone()[0]
            reasons = {r.value: r for r in Reason}
            return {k: reasons.get(v, Reason.MANUAL) for k, v in db.execute("SELECT key, reason FROM suppressions")}

    def changed(self) -> bool:
        """Whether another connection has changed the list since the last ``reasons()``
        (SQLite's ``data_version``: cheap, no table is read). True when the connection
        was closed since: what happened meanwhile is unknown."""
        with self._lock:
            db = self._connect(create=False)
            if db is None:
                return False
            return bool(db.execute("PRAGMA data_version").fetchone()[0] != self._version)


class RedisSuppressionStore:
    """The list as one Redis hash (``suppression.redis: true``): field = the address in
    lower case, value = the record as JSON; ``KEY:version`` counts changes, so that a
    reader reloads only when the list changed. Blocking (redis-py): call from a thread
    on an event loop, as :class:`SuppressionStore`."""

    def __init__(self, url: str, key: str = "dispatcher:suppressions") -> None:
        import redis

        self.key = key
        self.path = f"redis hash {key}"
        self._version_key = f"{key}:version"
        self._redis = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
        self._version: Any = None  # the version key's value when the list was read

    def __repr__(self) -> str:
        return f"<RedisSuppressionStore {self.key}>"

    def _call(self, what: str, op: Callable[[], Any]) -> Any:
        import redis

        try:
            return op()
        except redis.RedisError as exc:  # never the URL: it may hold a password
            raise StoreError(f"the suppression list (Redis hash {self.key}): {what}: {exc}") from None

    def close(self) -> None:
        self._redis.close()

    def add(self, records: Iterable[Record]) -> list[Record]:
        batch = list(records)
        if not batch:
            return []

        def write() -> list[Record]:
            pipe = self._redis.pipeline(transaction=False)
            for r in batch:
                row = {**r.as_dict(), "address": r.address.strip()}
                pipe.hsetnx(self.key, key_of(r.address), json.dumps(row, ensure_ascii=False))
            added = [r for r, new in zip(batch, pipe.execute(), strict=True) if new]
            if added:
                self._redis.incr(self._version_key)
            return added

        return list(self._call("add", write))

    def remove(self, addresses: Iterable[str]) -> int:
        keys = [key_of(a) for a in addresses]
        if not keys:
            return 0

        def delete() -> int:
            removed = int(self._redis.hdel(self.key, *keys))
            if removed:
                self._redis.incr(self._version_key)
            return removed

        return int(self._call("remove", delete))

    def find(self, addresses: Sequence[str]) -> dict[str, Record]:
        keys = list(dict.fromkeys(key_of(a) for a in addresses))
        if not keys:
            return {}
        values = self._call("read", lambda: self._redis.hmget(self.key, keys))
        return {k: _from_json(v) for k, v in zip(keys, values, strict=True) if v is not None}

    def records(self, reason: Reason | None = None) -> Iterator[Record]:
        found = [_from_json(v) for _, v in self._call("read", lambda: list(self._redis.hscan_iter(self.key,
                                                                                                    count=1000)))]
        found.sort(key=lambda r: (r.at, r.address.lower()))
        return iter([r for r in found if reason is None or r.reason is reason])

    def reasons(self) -> dict[str, Reason]:
        def read() -> dict[str, Reason]:
            self._version = self._redis.get(self._version_key)
            return {k.decode("utf-8", "surrogateescape"): _from_json(v).reason
                    for k, v in self._redis.hscan_iter(self.key, count=1000)}

        return dict(self._call("read", read))

    def changed(self) -> bool:
        return bool(self._call("read", lambda: self._redis.get(self._version_key)) != self._version)


def _from_json(value: bytes | str) -> Record:
    row = json.loads(value)
    try:
        reason = Reason(row.get("reason"))
    except ValueError:
        reason = Reason.MANUAL
    return Record(str(row.get("address", "")), reason, str(row.get("source") or ""), row.get("job_id"),
                  row.get("detail"), str(row.get("at") or ""))


class Store(Protocol):
    """What the list is kept in: :class:`SuppressionStore` or :class:`RedisSuppressionStore`."""

    @property
    def path(self) -> Any: ...
    def add(self, records: Iterable[Record]) -> list[Record]: ...
    def remove(self, addresses: Iterable[str]) -> int: ...
    def find(self, addresses: Sequence[str]) -> dict[str, Record]: ...
    def records(self, reason: Reason | None = None) -> Iterator[Record]: ...
    def reasons(self) -> dict[str, Reason]: ...
    def changed(self) -> bool: ...
    def close(self) -> None: ...


REDIS_URL_VARIABLE = "DISPATCHER_REDIS_URL"


def open_store(settings: SuppressionSettings, redis_url: str | None = None) -> Store:
    """The configured store. ``redis_url`` (else the environment's DISPATCHER_REDIS_URL)
    is needed with ``redis: true``; raises StoreError without one."""
    if not settings.redis:
        return SuppressionStore(settings.path)
    url = redis_url or os.environ.get(REDIS_URL_VARIABLE)
    if not url:
        raise StoreError("suppression.redis is true but no Redis is given (redis.url, --redis or "
                         f"${REDIS_URL_VARIABLE})")
    return RedisSuppressionStore(url, settings.redis_key)


def _record(row: Sequence[Any]) -> Record:
    address, reason, source, job_id, detail, at = row
    try:
        kind = Reason(reason)
    except ValueError:
        kind = Reason.MANUAL
    return Record(address, kind, source, job_id, detail, at)


class SuppressionMetrics:
    """``dispatcher_suppressed_total{reason}``: recipients left out of a message because
    they are on the list, by the reason they are on it; and
    ``dispatcher_suppressions_added_total{reason}``: addresses this process put on it."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.left_out = Counter("dispatcher_suppressed", "Recipients left out because they are on the "
                                "suppression list, by the reason they are on it.", ["reason"], registry=registry)
        self.added = Counter("dispatcher_suppressions_added", "Addresses this process put on the suppression "
                             "list, by reason.", ["reason"], registry=registry)
        for reason in Reason:
            self.left_out.labels(str(reason))
            self.added.labels(str(reason))


# Enhanced status codes (RFC 3463) that say the address itself is bad: 5.1.x (no such
# user, bad domain, bad syntax...) and 5.2.1 (mailbox disabled). 5.2.2 (mailbox full),
# 5.7.x (policy, spam) and anything transient say nothing for good about the address.
#: X.1.7 (bad sender's mailbox syntax) and X.1.8 (bad sender's system address) are
#: about the sender (RFC 3463 section 3.2), never the recipient.
SENDER_STATUSES = frozenset({"7", "8"})


def is_hard_bounce(status: str | None) -> bool:
    """``status`` (``5.1.1``) says the address is bad for good."""
    if not status:
        return False
    parts = status.strip().split(".")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        return False
    if parts[0] != "5":
        return False
    if parts[1] == "1":
        return parts[2] not in SENDER_STATUSES
    return parts[1] == "2" and parts[2] == "1"


def enhanced_status(text: str | None) -> str | None:
    """The RFC 3463 enhanced status at the start of a reply's text (``5.1.1 ...``)."""
    if not text:
        return None
    head = text.lstrip().split(None, 1)
    if not head:
        return None
    parts = head[0].rstrip(",;:").split(".")
    if len(parts) == 3 and parts[0] in ("2", "4", "5") and all(p.isdigit() and len(p) <= 3 for p in parts):
        return ".".join(parts)
    return None


class Admission:
    """What a run consults before sending: every suppressed address in memory.

    ``admit`` is a dictionary lookup per recipient; the list is reloaded (in a thread)
    when another process changes the store, at most every ``refresh`` seconds. With
    ``auto``, recipients refused with 5.1.x or 5.2.1 are added as ``hard_bounce``."""

    def __init__(self, store: Store, *, auto: bool = True, source: str = "run",
                 refresh: float = REFRESH_EVERY, registry: CollectorRegistry | None = None) -> None:
        self.store = store
        self.auto = auto
        self.source = source
        self.refresh = refresh
        self.metrics = SuppressionMetrics(registry)
        self._listed: dict[str, Reason] = {}
        self._added_since_load: list[tuple[str, Reason]] = []

    def __repr__(self) -> str:
        return f"<Admission {len(self._listed)} listed, auto={self.auto}, {self.store!r}>"

    def __len__(self) -> int:
        return len(self._listed)

    def load(self) -> None:
        """Read the whole list (blocking: at start, or in a thread)."""
        self._listed = self.store.reasons()

    def admit(self, recipients: Sequence[str]) -> tuple[list[str], list[str]]:
        """(recipients to send to, recipients left out because they are listed)."""
        listed = self._listed
        if not listed:
            return list(recipients), []
        kept: list[str] = []
        suppressed: list[str] = []
        for address in recipients:
            reason = listed.get(address.lower())  # envelope addresses: already as key_of makes them
            if reason is None:
                kept.append(address)
            else:
                suppressed.append(address)
                self.metrics.left_out.labels(reason.value).inc()
        return kept, suppressed

    async def watch(self) -> None:
        """Reload the list whenever another process changes it; runs until cancelled."""
        while True:
            await asyncio.sleep(self.refresh)
            if await asyncio.to_thread(self.store.changed):
                self._added_since_load = []
                listed = await asyncio.to_thread(self.store.reasons)
                listed.update(self._added_since_load)  # added here while the thread read
                self._listed = listed
                log.debug("suppression.reloaded", listed=len(listed))

    async def refused(self, job_id: str, refused: Mapping[str, tuple[int, str]], *,
                      delivered: bool = False) -> list[Record]:
        """Suppress (``auto``) the recipients ``refused`` with 5.1.x or 5.2.1; returns the
        records added. ``delivered``: some recipient accepted the message, so every
        refusal came from a recipient's own RCPT."""
        if not self.auto or not refused:
            return []
        if not delivered and len(refused) > 1 and len(set(refused.values())) == 1:
            # One reply for every recipient: MAIL FROM or the end of DATA refused the
            # message, which says nothing for good about any one address. (A relay
            # that answers several RCPTs with the very same text loses its automatic
            # suppression here; its DSNs or the next campaign's refusal still count.)
            return []
        records = []
        for address, (code, text) in refused.items():
            status = enhanced_status(text)
            if 500 <= code < 600 and is_hard_bounce(status):
                records.append(Record(address, Reason.HARD_BOUNCE, self.source, job_id, f"{code} {text}"[:1000]))
        if not records:
            return []
        try:
            added = await asyncio.to_thread(self.store.add, records)
        except (sqlite3.Error, StoreError, OSError) as exc:
            # The refusal is in the results file; the list is a best effort here.
            log.error("suppression.write_failed", path=str(self.store.path), error=str(exc))
            return []
        for record in records:
            entry = (key_of(record.address), Reason.HARD_BOUNCE)
            self._listed[entry[0]] = entry[1]
            self._added_since_load.append(entry)
        for _ in added:
            self.metrics.added.labels(Reason.HARD_BOUNCE.value).inc()
        return added

