"""The results file as the engine's ledger: a job's id is claimed by its line (resume,
duplicates) and each finished job is one row appended by the journal."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from dispatcher.batch.journal import Claim, Journal, JournalBusy, TempFileError
from dispatcher.batch.source import RunError
from dispatcher.compose.jobs import JobError
from dispatcher.engine.outcome import UNSENT, Outcome, result_row
from dispatcher.engine.ports import Delivery, Halt, Verdict
from dispatcher.engine.tally import Tally
from dispatcher.exit import ExitCode


class FileLedger:
    """The first line that carries an id owns it: a later line with the same id is an
    invalid duplicate, recorded without an id (keyed by its line number), so that its
    row can never mark the first line done. A row keyed by line number skips that line
    only while it still has no id of its own: a line fixed since (or shifted by an
    edit) is judged by its id."""

    def __init__(self, journal: Journal, results: Path, tally: Tally) -> None:
        self.journal = journal
        self.results = results
        self.tally = tally
        self.unrecorded: list[str] = []  # ids delivered whose result could not be written

    def open(self, jobs: os.stat_result) -> None:
        """Check and lock the results file. Raises RunError."""
        try:
            _check_results_file(self.results, jobs)
            self.journal.open()
        except JournalBusy as exc:
            raise RunError(str(exc)) from None
        except OSError as exc:
            raise RunError(f"{self.results}: cannot use the results file: {exc.strerror or exc}") from None

    def admit(self, delivery: Delivery) -> Verdict:
        try:
            if delivery.error is not None and not delivery.parsed:
                return self._admit_unparsed(delivery)
            return self._claim(delivery)
        except TempFileError as exc:
            raise Halt(ExitCode.USAGE, f"{exc.strerror}; run stopped") from exc

    def _claim(self, delivery: Delivery) -> Verdict:
        """A job with an id of its own (a composed one that failed later included): the
        line claims it."""
        job_id, number = delivery.job_id, delivery.line
        assert job_id is not None
        claim, first = self.journal.claim(job_id, number)
        if claim is Claim.DONE and not self.journal.may_retry(job_id):
            return Verdict.SKIP
        if claim is Claim.DUPLICATE:
            delivery.job_id = None  # its row, keyed by its line, never marks the first line done
            if self.journal.line_done(number):
                return Verdict.SKIP
            delivery.error = JobError("id", f"duplicate of line {first}'s id {job_id!r}")
            return Verdict.DUPLICATE
        if delivery.done:
            raise RuntimeError(f"line {number}: the compose process took id {job_id!r} for done")
        return Verdict.RETRY if claim is Claim.DONE else Verdict.SEND

    def _admit_unparsed(self, delivery: Delivery) -> Verdict:
        """A line that is not a valid job: invalid, keyed by its id when it has a
        readable one of its own, else by its line number; skipped when done before."""
        number = delivery.line
        if delivery.job_id is not None:
            claim, _ = self.journal.claim(delivery.job_id, number)
            if claim is Claim.DONE:
                return Verdict.SKIP
            if claim is Claim.DUPLICATE:
                delivery.job_id = None
        if delivery.job_id is None and self.journal.line_done(number):
            return Verdict.SKIP  # recorded by line number by an earlier run
        return Verdict.INVALID

    def to_retry(self, delivery: Delivery, recipients: list[str]) -> list[str]:
        assert delivery.job_id is not None
        return self.journal.to_retry(delivery.job_id, recipients)

    def settle(self, delivery: Delivery, outcome: Outcome) -> None:
        """One row; nothing for a job never sent (the next run sends it) or skipped. A
        line skipped whose earlier result was failed or invalid makes this run no
        success (exit 1)."""
        status = outcome.status
        if status == UNSENT:
            return
        if status == "skipped":
            if outcome.earlier and self.journal.unsent_before(delivery.job_id, delivery.line):
                self.tally.unsent_before += 1
            return
        job_id = delivery.job_id
        row = result_row(job_id, delivery.line, status, **outcome.fields)
        try:
            self.journal.record(row)
        except OSError as exc:
            if status == "sent":
                self.unrecorded.append(job_id if job_id is not None else f"line {delivery.line}")
            raise Halt(ExitCode.USAGE,
                       f"cannot write the results file {self.results}: {exc.strerror or exc}; run stopped "
                       "(jobs without a result are sent again by the next run)") from exc

    async def confirm(self, delivery: Delivery) -> bool:
        return True  # a jobs file has no leases: nothing is ever withdrawn


def _check_results_file(results: Path, jobs: os.stat_result) -> None:
    """The results file is a regular file, not the jobs file (it would be appended to
    the jobs being read). Raises RunError naming it."""
    try:
        found = os.stat(results)
    except OSError:
        return  # not there yet (created by the journal), or the journal says why not
    if not stat.S_ISREG(found.st_mode):
        kind = "a directory" if stat.S_ISDIR(found.st_mode) else "a pipe or FIFO" if stat.S_ISFIFO(found.st_mode) else (
            "a device or socket")
        raise RunError(f"{results}: the results file must be a regular file, not {kind}")
    if (found.st_dev, found.st_ino) == (jobs.st_dev, jobs.st_ino):
        raise RunError(f"{results}: the results file is the jobs file; name another one with --results")
