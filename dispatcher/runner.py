"""``dispatcher run``: jobs file -> pool -> results file, with signals, progress, metrics.

The reader streams lines into a small bounded queue; a fixed set of senders take
from it and await ``pool.submit``. Memory depends on the pool's size and queue, not
on the file's length.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import structlog
from prometheus_client import CollectorRegistry, Counter, start_http_server, write_to_textfile

from dispatcher.config import Settings, pool_kwargs
from dispatcher.jobs import JobError, Line, Outgoing, build, parse_job, read_lines
from dispatcher.journal import IdSet, Journal
from dispatcher.sink import DEFAULT_MAILDIR, CaptureServer
from pool import DeliveryError, PoolClosedError, SMTPPool

log = structlog.get_logger("dispatcher")

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE, EXIT_SIGNAL = 0, 1, 2, 130
STATUSES = ("sent", "failed", "invalid", "skipped")
LOG_PROGRESS_EVERY = 10.0
TTY_PROGRESS_EVERY = 0.25


@dataclass
class RunOptions:
    jobs: str
    results: Path
    progress: bool | None = None  # None: a bar when stderr is a terminal
    maildir: Path = DEFAULT_MAILDIR


@dataclass(slots=True)
class _Item:
    """A valid job on its way to the pool."""

    line: int
    job_id: str
    size: int  # bytes of its line, for the progress bar
    outgoing: Outgoing


@dataclass
class Tally:
    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    started: float = field(default_factory=time.monotonic)
    bytes_done: int = 0  # of lines whose job has ended: what the bar shows
    bytes_total: int | None = None

    def rate(self) -> float:
        elapsed = time.monotonic() - self.started
        done = self.counts["sent"] + self.counts["failed"]
        return done / elapsed if elapsed > 0 else 0.0


class Run:
    def __init__(self, options: RunOptions, settings: Settings) -> None:
        self.options = options
        self.settings = settings
        self.registry = CollectorRegistry()
        jobs_total = Counter("dispatcher_jobs", "Jobs of this run by outcome.", ["status"], registry=self.registry)
        self.jobs_total = {status: jobs_total.labels(status=status) for status in STATUSES}
        self.tally = Tally()
        self.journal = Journal(options.results)
        self.seen = IdSet()
        self.stopping = asyncio.Event()
        self.signalled = False
        self.pool: SMTPPool | None = None
        self._hurry: asyncio.Future[None] | None = None

    # -- results --

    def _record(self, line: int, job_id: str | None, status: str, size: int, **fields: Any) -> None:
        self.journal.record({
            "id": job_id, "line": line, "status": status,
            "attempts": fields.get("attempts", 0), "code": fields.get("code"),
            "response": fields.get("response"), "refused": fields.get("refused", {}),
            "error": fields.get("error"), "elapsed_ms": fields.get("elapsed_ms", 0),
        })
        self._count(status, size)

    def _count(self, status: str, size: int) -> None:
        self.tally.counts[status] += 1
        self.tally.bytes_done += size
        self.jobs_total[status].inc()

    # -- the run --

    async def execute(self) -> int:
        self.journal.open()
        sink: CaptureServer | None = None
        metrics_server = None
        try:
            if self.settings.smtp is None:
                sink = await CaptureServer(maildir=self.options.maildir).start()
                print(
                    f"dispatcher: no relay configured (no smtp: section); delivering to the built-in "
                    f"capture server on 127.0.0.1:{sink.port}, Maildir {self.options.maildir}/",
                    file=sys.stderr,
                )
                kwargs = _local_kwargs(self.settings, sink.port)
            else:
                kwargs = pool_kwargs(self.settings)
            if self.settings.metrics.port is not None:
                metrics_server = start_http_server(self.settings.metrics.port, registry=self.registry)
            self.pool = SMTPPool(**kwargs, registry=self.registry)
            log.info("run.start", jobs=self.options.jobs, results=str(self.options.results),
                     host=kwargs["hostname"], port=kwargs["port"], size=kwargs["size"],
                     resumed=len(self.journal.done))
            with self._signals():
                await self._pump(self.pool)
        finally:
            self.journal.close()
            if sink is not None:
                await sink.stop()
            if self.settings.metrics.textfile is not None:
                write_to_textfile(str(self.settings.metrics.textfile), self.registry)
            if metrics_server is not None:
                server = metrics_server[0] if isinstance(metrics_server, tuple) else None
                if server is not None:
                    server.shutdown()
        counts = self.tally.counts
        elapsed = time.monotonic() - self.tally.started
        log.info("run.summary", **counts, elapsed_s=round(elapsed, 3), rate=round(self.tally.rate(), 1),
                 stopped_by_signal=self.signalled)
        if self.signalled:
            return EXIT_SIGNAL
        return EXIT_SOME_FAILED if counts["failed"] or counts["invalid"] else EXIT_OK

    async def _pump(self, pool: SMTPPool) -> None:
        # One sender per message the pool can hold (its sessions and its queue): the
        # pool's queue is the backpressure; this hand-off queue only decouples reading.
        senders = pool.size + pool.queue_size
        queue: asyncio.Queue[_Item | None] = asyncio.Queue(maxsize=pool.size)
        progress = asyncio.create_task(self._progress())
        try:
            async with asyncio.TaskGroup() as group:
                for _ in range(senders):
                    group.create_task(self._sender(pool, queue))
                try:
                    await self._read(queue)
                finally:
                    for _ in range(senders):
                        await queue.put(None)
            await pool.close()
        finally:
            progress.cancel()
            await asyncio.gather(progress, return_exceptions=True)
            await pool.close(drain=False)  # no-op after a clean close; otherwise fail the waiting
            if self._hurry is not None:
                await self._hurry  # a second signal's close(drain=False): owned and awaited here

    async def _read(self, queue: asyncio.Queue[_Item | None]) -> None:
        with _open_jobs(self.options.jobs) as stream:
            if stream is not sys.stdin.buffer:
                try:
                    self.tally.bytes_total = os.fstat(stream.fileno()).st_size
                except OSError:
                    pass
            for n, line in enumerate(read_lines(stream)):
                if self.stopping.is_set():
                    return
                item = self._admit(line)
                if item is not None:
                    await queue.put(item)
                if n % 64 == 63:
                    await asyncio.sleep(0)  # let senders, results, signals and progress through

    def _admit(self, line: Line) -> _Item | None:
        """Validate a line; record it as invalid or skipped, or return it to send."""
        size = line.size
        try:
            job = parse_job(line)
        except JobError as exc:
            if exc.job_id is not None and exc.job_id in self.journal.done:
                self._count("skipped", size)  # recorded as invalid by an earlier run
            else:
                self._invalid(line.number, exc.job_id, exc, size)
            return None
        if not self.seen.add(job.id):
            if job.id in self.journal.done:
                self._count("skipped", size)
                return None
            self._invalid(line.number, job.id, JobError("id", f"duplicate of an earlier line's id {job.id!r}"), size)
            return None
        if job.id in self.journal.done:
            self._count("skipped", size)
            return None
        try:
            return _Item(line.number, job.id, size, build(job))
        except JobError as exc:
            self._invalid(line.number, job.id, exc, size)
            return None

    def _invalid(self, number: int, job_id: str | None, exc: JobError, size: int) -> None:
        message = f"line {number}: {exc}"
        log.warning("job.invalid", line=number, id=job_id, field=exc.field, error=str(exc))
        self._record(number, job_id, "invalid", size, error=message)

    async def _sender(self, pool: SMTPPool, queue: asyncio.Queue[_Item | None]) -> None:
        while (item := await queue.get()) is not None:
            if self.stopping.is_set():
                continue  # not submitted: the next run sends it
            number, job_id, size, outgoing = item.line, item.job_id, item.size, item.outgoing
            started = time.monotonic()
            try:
                result = await pool.submit(outgoing.message, sender=outgoing.sender, recipients=outgoing.recipients)
            except DeliveryError as exc:
                self._record(number, job_id, "failed", size, attempts=exc.attempts, code=exc.code,
                             response=exc.response, refused=_refusals(exc.refused), error=str(exc),
                             elapsed_ms=_ms(started))
            except PoolClosedError:
                continue  # never sent: not recorded, so a re-run sends it
            except ValueError as exc:
                self._invalid(number, job_id, JobError("", str(exc)), size)
            else:
                self._record(number, job_id, "sent", size, attempts=result.attempts, code=result.code,
                             response=result.response, refused=_refusals(result.refused),
                             elapsed_ms=round(result.elapsed * 1000, 1))

    async def _progress(self) -> None:
        tty = self.options.progress if self.options.progress is not None else sys.stderr.isatty()
        if self.options.progress is False:
            return
        try:
            while True:
                await asyncio.sleep(TTY_PROGRESS_EVERY if tty else LOG_PROGRESS_EVERY)
                if tty:
                    sys.stderr.write("\r" + self._bar())
                    sys.stderr.flush()
                else:
                    log.info("run.progress", **self.tally.counts, rate=round(self.tally.rate(), 1),
                             queue_depth=self.pool.queue_depth() if self.pool else 0)
        finally:
            if tty:
                sys.stderr.write("\r" + self._bar() + "\n")
                sys.stderr.flush()

    def _bar(self) -> str:
        c, t = self.tally.counts, self.tally
        if t.bytes_total:
            share = min(1.0, t.bytes_done / t.bytes_total)
            filled = int(share * 30)
            head = f"[{'#' * filled}{'.' * (30 - filled)}] {share:6.1%} "
        else:
            head = ""
        return (f"{head}sent {c['sent']}  failed {c['failed']}  invalid {c['invalid']}  "
                f"skipped {c['skipped']}  {t.rate():.0f} msg/s ")

    @contextmanager
    def _signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()

        def stop(signum: int) -> None:
            if self.stopping.is_set():
                # A second signal: stop waiting for queued messages too.
                if self.pool is not None:
                    self._hurry = asyncio.ensure_future(self.pool.close(drain=False))
                return
            self.signalled = True
            self.stopping.set()
            log.warning("run.stopping", signal=signal.Signals(signum).name)

        installed = []
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(signum, stop, signum)
                installed.append(signum)
            except (NotImplementedError, RuntimeError):
                pass
        try:
            yield
        finally:
            for signum in installed:
                loop.remove_signal_handler(signum)


def _local_kwargs(settings: Settings, port: int) -> dict[str, Any]:
    from dispatcher.config import SMTPSettings

    return pool_kwargs(settings.model_copy(update={"smtp": SMTPSettings(hostname="127.0.0.1", port=port)}))


def _refusals(refused: dict[str, tuple[int, str]]) -> dict[str, list[Any]]:
    return {rcpt: [code, text] for rcpt, (code, text) in refused.items()}


def _ms(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 1)


@contextmanager
def _open_jobs(jobs: str) -> Iterator[IO[bytes]]:
    if jobs == "-":
        yield sys.stdin.buffer
        return
    with open(jobs, "rb") as stream:
        yield stream
