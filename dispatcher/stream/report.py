"""``dispatcher status`` and ``dispatcher results``: read-only views of the stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import IO, Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis

from dispatcher.stream.keys import Keys

RESULTS_CHUNK = 1000


@dataclass
class Status:
    stream: str
    group: str
    enqueued: int = 0
    rejected: int = 0  # invalid at enqueue (also counted in done["invalid"])
    done: dict[str, int] = field(default_factory=lambda: {"sent": 0, "failed": 0, "invalid": 0})
    waiting: int = 0  # in the stream, never delivered
    pending: int = 0  # delivered, not yet acknowledged
    consumers: list[dict[str, Any]] = field(default_factory=list)  # name, pending, idle_s
    dead: int = 0
    finished_last_minute: int = 0
    window_s: int = 60  # seconds of the last minute since the first job finished in it

    @property
    def rate(self) -> float:
        """Jobs finished per second over the last minute, or since the first of them
        finished when that was less than a minute ago (a run seconds old is not /60)."""
        return self.finished_last_minute / max(1, self.window_s)

    def as_dict(self) -> dict[str, Any]:
        return {"stream": self.stream, "group": self.group, "enqueued": self.enqueued, "rejected": self.rejected,
                "done": dict(self.done), "done_total": sum(self.done.values()), "waiting": self.waiting,
                "pending": self.pending, "consumers": self.consumers, "dead": self.dead,
                "finished_last_minute": self.finished_last_minute, "rate_per_s": round(self.rate, 2)}

    def render(self) -> str:
        done = ", ".join(f"{status} {count}" for status, count in self.done.items())
        lines = [
            f"stream: {self.stream} (group {self.group})",
            f"enqueued: {self.enqueued}",
            f"invalid at enqueue: {self.rejected}",
            f"done: {sum(self.done.values())} ({done})",
            f"waiting: {self.waiting}",
            f"pending: {self.pending}",
        ]
        lines += [f"  {c['name']}: {c['pending']} pending, idle {c['idle_s']:.1f} s" for c in self.consumers]
        lines += [
            f"dead: {self.dead}",
            f"rate: {self.rate:.1f}/s over the last "
            f"{'minute' if self.window_s >= 60 else f'{self.window_s} s'} ({self.finished_last_minute} finished)",
        ]
        return "\n".join(lines) + "\n"


async def status(redis: Redis, keys: Keys, group: str) -> Status:
    """What the stream holds now. Works on a stream that does not exist yet (all zero)."""
    result = Status(keys.stream, group)
    raw: dict[Any, Any] = await redis.hgetall(keys.stats)
    stats = {(k.decode() if isinstance(k, bytes) else str(k)): int(v) for k, v in raw.items()}
    result.enqueued = stats.get("enqueued", 0)
    result.rejected = stats.get("rejected", 0)
    for status_name in result.done:
        result.done[status_name] = stats.get(status_name, 0)
    if stats.get("suppressed"):  # jobs whose every recipient is on the suppression list
        result.done["suppressed"] = stats["suppressed"]
    length = int(await redis.xlen(keys.stream))
    try:
        consumers = await redis.xinfo_consumers(keys.stream, group)
    except redis_errors.ResponseError:  # no stream or no group yet
        consumers = []
    for consumer in consumers:
        name: Any = consumer["name"]
        result.consumers.append({
            "name": name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name),
            "pending": int(consumer["pending"]),
            "idle_s": round(int(consumer["idle"]) / 1000, 1),
        })
    result.consumers.sort(key=lambda c: (-c["pending"], c["name"]))
    result.pending = sum(c["pending"] for c in result.consumers)
    result.waiting = max(0, length - result.pending)  # acknowledged entries are deleted
    result.dead = int(await redis.xlen(keys.dead))
    now = int((await redis.time())[0])
    counts = await redis.mget([f"{keys.finished}:{second}" for second in range(now - 59, now + 1)])
    result.finished_last_minute = sum(int(c) for c in counts if c is not None)
    first = next((i for i, c in enumerate(counts) if c is not None and int(c)), None)
    result.window_s = 60 - first if first is not None else 60
    return result


async def write_results(redis: Redis, keys: Keys, out: IO[bytes]) -> int:
    """Write every row of the results stream to ``out``, oldest first. Returns the count."""
    start = "-"
    written = 0
    while True:
        entries: list[Any] = await redis.xrange(keys.results, min=start, max="+", count=RESULTS_CHUNK) or []
        for _entry_id, fields in entries:
            row: bytes | None = (fields or {}).get(b"r")
            if row is not None:
                out.write(row + b"\n")
                written += 1
        if len(entries) < RESULTS_CHUNK:
            return written
        last = entries[-1][0]
        start = "(" + (last.decode() if isinstance(last, bytes) else str(last))

