"""``dispatcher run``: the jobs file and its results file plugged into the engine
(``dispatcher.engine``), with signals, progress, metrics and the exit status.

Whatever stops the run early (a signal, a results file that cannot be written, the
relay refusing the session, a bug) stops it the same way: the engine stops reading,
``pool.close(drain=False)`` fails what is still queued (not sent, not recorded: the
next run sends it) while the transactions on the wire finish and are recorded. A
second signal ``terminate()``s the pool.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry

from dispatcher.batch.journal import Journal
from dispatcher.batch.ledger import FileLedger
from dispatcher.batch.source import FileSource, RunError, open_jobs
from dispatcher.compose.process import ComposeProcess
from dispatcher.compose.stage import Composer
from dispatcher.compose.templates import TemplatesSettings
from dispatcher.config import Settings
from dispatcher.engine.engine import Engine
from dispatcher.engine.tally import STATUSES, Tally
from dispatcher.exit import ExitCode
from dispatcher.loop.suppression import Admission, StoreError, open_store
from dispatcher.observe.metrics import MetricsError, MetricsServer, RunMetrics, write_textfile
from dispatcher.observe.metrics import serve as serve_metrics
from dispatcher.relays import Sender
from dispatcher.sender import Sending, build_sender
from dispatcher.signals import signal_handlers
from dispatcher.sink import DEFAULT_MAILDIR

log = structlog.get_logger("dispatcher")

__all__ = ["STATUSES", "Run", "RunError", "RunOptions", "Tally"]


@dataclass
class RunOptions:
    jobs: str
    results: Path
    progress: bool | None = None  # None: a bar when stderr is a terminal
    maildir: Path = DEFAULT_MAILDIR
    attachments_root: Path | None = None  # None: config jobs.attachments_root, else the jobs file's directory
    retry_failed: bool = False  # send again the recipients an earlier run left with a transient failure
    compose_process: bool | None = None  # None: a second process composes when the jobs are a file and 2+ cores


class Run:
    def __init__(self, options: RunOptions, settings: Settings) -> None:
        self.options = options
        self.settings = settings
        self.registry = CollectorRegistry()
        self.tally = Tally()
        RunMetrics(self.tally, self.registry)  # dispatcher_*, read from the tally when scraped
        self.journal = Journal(options.results, retry_failed=options.retry_failed)
        self.ledger = FileLedger(self.journal, options.results, self.tally)
        self.pool: Sender | None = None  # an SMTPPool, or a RelayRouter under relays:
        self.engine: Engine | None = None
        self.signalled = False
        self._source: FileSource | None = None
        self._stop_code: int | None = None  # why the run stopped early, as an exit status
        self._said: set[str] = set()
        self._announce: list[tuple[str, dict[str, Any]]] = []  # logged once the display is up
        if options.jobs == "-":
            self.base = Path.cwd()
        else:
            self.base = Path(os.path.abspath(options.jobs)).parent
        self.attachments_root = options.attachments_root or settings.jobs.attachments_root or self.base
        try:
            store = open_store(settings.suppression, settings.redis.url)
        except StoreError as exc:
            raise RunError(str(exc)) from None
        self.admission = Admission(store, auto=settings.suppression.auto, refresh=settings.suppression.refresh,
                                   registry=self.registry)

    @property
    def _composing(self) -> ComposeProcess | None:
        return self._source.composing if self._source is not None else None

    # -- opening --

    def _open(self) -> FileSource:
        """Open the jobs and lock the results file. Raises RunError."""
        composer = self._composer()
        jobs = open_jobs(self.options.jobs)
        try:
            self.ledger.open(jobs.status)
        except BaseException:
            jobs.close()
            raise
        if jobs.regular:
            self.tally.bytes_total = jobs.status.st_size
        return FileSource(jobs, composer, self.tally, journal=self.journal,
                          compose_process=self.options.compose_process)

    def _composer(self) -> Composer:
        """The compose stage, once what every job needs is known to be there (it reads
        the DKIM key). Raises RunError."""
        root = self.attachments_root
        if not root.is_dir():
            raise RunError(f"attachments root {root}: not a directory")
        where = self.settings.templates.dir
        if where != TemplatesSettings().dir and not where.is_dir():  # configured (the default may be absent)
            # Every templated job would fail alike: say it before anything is sent or recorded.
            raise RunError(f"templates.dir: {str(where)!r} does not exist (a relative directory is "
                           f"taken from {str(Path.cwd())!r})")
        try:
            self.admission.load()
        except StoreError as exc:
            raise RunError(str(exc)) from None
        finally:
            self.admission.store.close()  # no SQLite connection across the compose process's fork
        try:
            # The batch, from which Message-IDs are derived, is the results file (docs/run.md).
            return Composer(self.settings, base_dir=self.base, attachments_root=root,
                            batch=os.path.abspath(self.options.results))
        except ValueError as exc:
            raise RunError(str(exc)) from None

    def _serve_metrics(self) -> MetricsServer | None:
        if self.settings.metrics.port is None:
            return None
        try:  # first: a busy port is the only line said, no file made
            server = serve_metrics(self.settings.metrics.address, self.settings.metrics.port, self.registry)
        except MetricsError as exc:
            raise RunError(str(exc)) from None
        self._announce.append(("run.metrics", {"url": server.url}))
        return server

    # -- the run --

    async def execute(self) -> int:
        """Run to the end; returns the exit status. Raises RunError before anything is sent."""
        metrics_server = self._serve_metrics()
        try:
            source = self._source = self._open()
        except BaseException:
            if metrics_server is not None:
                metrics_server.stop()
            raise
        sending: Sending | None = None
        try:
            sending = await build_sender(self.settings, self.registry, maildir=self.options.maildir,
                                         command="dispatcher")
            self.pool = sending.sender
            self._announce.append(("run.start", {
                "jobs": self.options.jobs, "results": str(self.options.results), **sending.where,
                "size": self.pool.size, "resumed": self.journal.resumed}))
            self.engine = Engine(source, self.ledger, source.composer, self.pool, admission=self.admission,
                                 tally=self.tally, say=self._error, max_bytes=self.settings.pool.max_bytes_in_flight,
                                 progress=self.options.progress, announce=self._announce)
            with signal_handlers(self._on_signal):
                await self.engine.run()
        finally:
            self._stop_code = self.engine.stop_code if self.engine is not None else None
            await self._close(source, sending, metrics_server)
        return self._summary()

    async def _close(self, source: FileSource, sending: Sending | None, metrics_server: MetricsServer | None) -> None:
        source.close()
        try:
            # A run that stopped on its configuration or the relay before its first
            # result leaves no empty results file of its own behind.
            self.journal.close(discard_unused=self._stop_code in (ExitCode.USAGE, ExitCode.RELAY_DOWN))
        except OSError as exc:  # the last fsync: results of this run may not be on disk
            self._error(f"cannot write the results file {self.options.results}: {exc.strerror or exc}")
            if self._stop_code is None:
                self._stop_code = ExitCode.USAGE
        if sending is not None:
            await sending.close()
        if self.settings.metrics.textfile is not None and self.pool is not None:  # the run started
            self.tally.finished = time.time()
            problem = write_textfile(self.settings.metrics.textfile, self.registry)
            if problem is not None:
                self._error(problem)
        if metrics_server is not None:
            metrics_server.stop()

    def _summary(self) -> int:
        """The last lines of the run; returns its exit status."""
        unrecorded = self.ledger.unrecorded
        if unrecorded:  # the operator may want to know: the next run sends them again
            shown = ", ".join(repr(i) for i in unrecorded[:20])
            more = f" and {len(unrecorded) - 20} more" if len(unrecorded) > 20 else ""
            self._error(f"{len(unrecorded)} message(s) were delivered but their results could not be "
                        f"written; the next run sends them again: {shown}{more}")
        counts = self.tally.counts
        elapsed = time.monotonic() - self.tally.started
        log.info("run.summary", **counts, elapsed_s=round(elapsed, 3), rate=round(self.tally.rate(), 1),
                 skipped_not_sent=self.tally.unsent_before, blank_lines=self.tally.blank,
                 stopped_by_signal=self.signalled)
        if self._stop_code is not None:
            return self._stop_code
        return ExitCode.FAILED if counts["failed"] or counts["invalid"] or self.tally.unsent_before else ExitCode.OK

    def _error(self, message: str) -> None:
        """One line on stderr, once (every sender may hit the same full disk)."""
        if message not in self._said:
            self._said.add(message)
            print(f"dispatcher: {message}", file=sys.stderr, flush=True)

    def _on_signal(self, signum: int) -> None:
        engine = self.engine
        assert engine is not None
        name = signal.Signals(signum).name
        if engine.stopping:
            # A second signal (or a signal after an error stopped the run): drop
            # every session now; what was on the wire is not recorded.
            log.warning("run.terminating", signal=name)
            engine.abort()
            return
        self.signalled = True
        log.warning("run.stopping", signal=name)
        engine.halt(ExitCode.SIGNAL, f"{name}: stopping; the messages on the wire finish, the rest are not sent "
                                     "(the next run sends them). A second signal stops at once.")
