"""``dispatcher enqueue``: validate a jobs file as ``run`` does and append its jobs to the stream.

Valid jobs are appended as their own line (the worker parses it again). Invalid lines
become ``invalid`` rows of the results stream at once. Enqueuing the same file again
adds nothing twice: a job by its id, an invalid line by its id, or, when it has no id
of its own (unreadable, or a duplicate of an earlier line's), by line number and digest.

Attachment paths are checked here (inside the attachments root, regular files) and
stored relative to that root; a worker reads them relative to its own.

Ids seen in this file are kept as 8-byte digests (``IdSet``); the rare duplicate asks
Redis for the line that owns the id, so memory does not grow with the ids' length.
"""

from __future__ import annotations

import hashlib
import os
import stat
import sys
from dataclasses import dataclass
from typing import IO

import orjson
import structlog
from redis.asyncio import Redis

from dispatcher.batch.journal import IdSet
from dispatcher.compose.address import parse_address, parse_mailbox
from dispatcher.compose.jobs import JobError, Line, RawJob, parse_line, read_lines
from dispatcher.compose.stage import AnyJob, Composer, reads_files
from dispatcher.compose.templates import TemplatedJob
from dispatcher.loop.suppression import Admission
from dispatcher.stream.keys import Keys
from dispatcher.stream.scripts import ENQUEUE
from dispatcher.stream.store import encoded_row, ensure_group, retrying

log = structlog.get_logger("dispatcher.enqueue")

BATCH = 500  # lines per script call: one round trip, and a short time inside Redis
#: Bytes of jobs per script call: with lines of megabytes (attachments inline), memory
#: stays bounded by this, not by BATCH lines of whatever size (300 lines of 2 MB: 2.5 GB).
BATCH_BYTES = 4 << 20


@dataclass
class EnqueueCounts:
    added: int = 0  # jobs appended to the stream
    rejected: int = 0  # invalid lines recorded in the results stream
    already: int = 0  # lines enqueued by an earlier call
    invalid_lines: int = 0  # invalid lines in this file, recorded now or earlier
    suppressed: int = 0  # jobs recorded suppressed (every recipient on the suppression list)


Row = tuple[bytes, bytes, bytes, bytes, bytes]  # kind, key, id to mark done, line, payload


class Enqueuer:
    def __init__(self, redis: Redis, keys: Keys, group: str, composer: Composer | None = None,
                 admission: Admission | None = None) -> None:
        """``composer`` (unsigned) validates what ``run`` would: rendered templates when
        the templates directory is here, unsubscribe headers, the message build. Without
        it only the job's shape is checked. ``admission`` (the suppression list): a job
        whose every recipient is on it is recorded ``suppressed`` instead of enqueued
        (one with some left goes on the stream; the worker leaves the others out)."""
        self.composer = composer
        self.admission = admission
        self._templates_here = composer is not None and composer.templates.directory.is_dir()
        self.redis = redis
        self.keys = keys
        self.group = group
        self.counts = EnqueueCounts()
        self._seen = IdSet()
        self._batch: list[Row] = []
        self._batch_bytes = 0
        self._script = redis.register_script(ENQUEUE)

    async def enqueue(self, stream: IO[bytes]) -> EnqueueCounts:
        await retrying(lambda: ensure_group(self.redis, self.keys, self.group), what="create group",
                       wait_out_of_memory=False)
        self._batch = []
        for line in read_lines(stream):
            row = await self.admit(line)  # may flush, replacing self._batch
            self._batch.append(row)
            self._batch_bytes += len(row[4])
            if len(self._batch) >= BATCH or self._batch_bytes >= BATCH_BYTES:
                await self._flush()
        await self._flush()
        return self.counts

    async def admit(self, line: Line) -> Row:
        """The row for one line: the same validation and duplicate rules as ``run``,
        except that attachments given by path are read by the worker, not here."""
        number = str(line.number).encode()
        try:
            job = parse_line(line)
        except JobError as exc:
            if exc.job_id is not None and await self._owner(exc.job_id) is None:
                return self._invalid(b"I", exc.job_id.encode(), exc.job_id, line, exc)
            return self._invalid(b"L", _line_key(line, exc.job_id), None, line, exc)
        first = await self._owner(job.id)
        if first is not None:
            error = JobError("id", f"duplicate of line {first}'s id {job.id!r}")
            return self._invalid(b"L", _line_key(line, job.id), None, line, error)
        # What the worker will do; files excepted (they are the worker's to read), and
        # templates when their directory is not on this machine (the worker renders them).
        checkable = not reads_files(job) and (self._templates_here or not isinstance(job, TemplatedJob))
        if self.composer is not None and checkable:
            try:
                self.composer.check(job)
            except JobError as exc:
                return self._invalid(b"I", job.id.encode(), job.id, line, exc)
        assert line.content is not None
        content = line.content.rstrip(b"\r\n")
        if self.composer is not None and reads_files(job):
            try:
                content = self._rooted(content)
            except JobError as exc:
                return self._invalid(b"I", job.id.encode(), job.id, line, JobError(exc.field, str(exc), job.id))
        if self.admission is not None:
            kept, suppressed = self.admission.admit(_recipients(job))
            if suppressed and not kept:
                row = encoded_row(job.id, line.number, "suppressed", suppressed=suppressed)
                return (b"S", job.id.encode(), job.id.encode(), number, row)
        return (b"J", job.id.encode(), job.id.encode(), number, content)

    def _rooted(self, content: bytes) -> bytes:
        """The job with each attachment ``path`` made relative to the attachments root:
        resolved against the jobs file's directory as ``run`` does, it must name a
        regular file inside the root (not read here). A worker reads it relative to its
        own root, the same files on every machine (a shared mount). Raises JobError."""
        assert self.composer is not None
        base, root = self.composer.base_dir, os.path.realpath(self.composer.attachments_root)
        record = orjson.loads(content)
        for i, attachment in enumerate(record.get("attachments") or ()):
            path = attachment.get("path") if isinstance(attachment, dict) else None
            if path is None:
                continue
            field = f"attachments.{i}.path"
            target = os.path.realpath(os.path.join(base, path))
            if os.path.commonpath([target, root]) != root:
                raise JobError(field, f"{path!r} is outside the attachments root {root!r}")
            try:
                regular = stat.S_ISREG(os.stat(target).st_mode)
            except OSError as exc:
                raise JobError(field, f"cannot read {path!r}: {exc.strerror}") from None
            if not regular:
                raise JobError(field, f"{path!r} is not a regular file")
            attachment["path"] = os.path.relpath(target, root)
        return orjson.dumps(record)

    async def _owner(self, job_id: str) -> int | None:
        """The line of this file that already has ``job_id``, or None (the line now owns it)."""
        if self._seen.add(job_id):
            return None
        await self._flush()  # the owner may still be in the batch
        first = await retrying(lambda: self.redis.hget(self.keys.ids, job_id), what="enqueue")
        if first is None:  # two ids sharing a digest: this one is new after all
            return None
        return int(first)

    def _invalid(self, kind: bytes, key: bytes, job_id: str | None, line: Line, exc: JobError) -> Row:
        self.counts.invalid_lines += 1
        message = f"line {line.number}: {exc}"
        log.warning("job.invalid", line=line.number, id=job_id, field=exc.field, error=str(exc))
        row = encoded_row(job_id, line.number, "invalid", error=message)
        marked = job_id.encode() if kind == b"I" and job_id is not None else b""
        return (kind, key, marked, str(line.number).encode(), row)

    async def _flush(self) -> None:
        batch, self._batch = self._batch, []
        self._batch_bytes = 0
        if not batch:
            return
        args = [part for row in batch for part in row]
        keys = [self.keys.stream, self.keys.results, self.keys.ids, self.keys.lines, self.keys.done,
                self.keys.stats, self.keys.invalid]
        # At maxmemory: an error at once, not a wait (what is added stays; enqueuing again adds the rest).
        added, rejected, already, suppressed = await retrying(lambda: self._script(keys=keys, args=args),
                                                              what="enqueue", wait_out_of_memory=False)
        self.counts.suppressed += int(suppressed)
        self.counts.added += int(added)
        self.counts.rejected += int(rejected)
        self.counts.already += int(already)


def _recipients(job: AnyJob) -> list[str]:
    """The envelope recipients of a valid job (as the compose stage makes them)."""
    try:
        if isinstance(job, RawJob):
            return [parse_address(a).address for a in job.rcpt_to]
        return [parse_mailbox(str(a)).address for a in [*job.to, *(job.cc or ()), *(job.bcc or ())]]
    except ValueError:  # not for the list to judge: the worker finds what is wrong
        return []


def _line_key(line: Line, job_id: str | None) -> bytes:
    digest = hashlib.blake2b(line.content or b"", digest_size=12).hexdigest()
    return f"{line.number}:{digest}:{job_id or ''}".encode("utf-8", "surrogatepass")


def open_jobs(jobs: str) -> IO[bytes]:
    """The jobs file, or standard input for ``-``. Raises OSError."""
    if jobs == "-":
        return sys.stdin.buffer
    return open(jobs, "rb")
