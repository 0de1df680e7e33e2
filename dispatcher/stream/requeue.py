"""``dispatcher requeue``: dead-lettered (and invalid) jobs back on the stream for another try."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

from redis.asyncio import Redis

from dispatcher.stream.keys import Keys
from dispatcher.stream.scripts import REQUEUE
from dispatcher.stream.store import ensure_group, retrying

CHUNK = 500  # entries read, and moved by one script call


@dataclass
class RequeueCounts:
    dead: int = 0  # dead-lettered jobs back on the stream
    invalid: int = 0  # jobs a worker recorded invalid, back on the stream
    forgotten: int = 0  # ids invalid at enqueue, forgotten: enqueuing the fixed file adds them


async def requeue(redis: Redis, keys: Keys, group: str, *, dead: bool, invalid: bool,
                  ids: set[str] | None = None) -> RequeueCounts:
    """Move the entries of ``:dead`` and/or ``:invalid`` (only ``ids`` when given) back
    to the jobs stream. Safe to run again after an interruption: each entry moves in
    one script call, which removes it from its source."""
    await retrying(lambda: ensure_group(redis, keys, group), what="create group", wait_out_of_memory=False)
    script = redis.register_script(REQUEUE)
    counts = RequeueCounts()
    sources = [(keys.dead, "dead")] if dead else []
    sources += [(keys.invalid, "invalid")] if invalid else []
    for source, kind in sources:
        start = "-"
        while True:
            read: Any = partial(redis.xrange, source, min=start, max="+", count=CHUNK)
            entries: list[Any] = await retrying(read, what="requeue") or []
            chosen = [entry_id for entry_id, fields in entries
                      if ids is None or (fields or {}).get(b"id", b"").decode("utf-8", "replace") in ids]
            if chosen:
                script_keys = [keys.stream, source, keys.done, keys.stats, keys.errors, keys.results, keys.ids]
                args: list[Any] = [kind, *chosen]
                moved, forgotten = await retrying(partial(script, keys=script_keys, args=args), what="requeue",
                                                  wait_out_of_memory=False)
                if kind == "dead":
                    counts.dead += int(moved)
                else:
                    counts.invalid += int(moved)
                counts.forgotten += int(forgotten)
            if len(entries) < CHUNK:
                break
            last = entries[-1][0]
            start = "(" + (last.decode() if isinstance(last, bytes) else str(last))
    return counts
