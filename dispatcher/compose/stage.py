"""The compose stage: one job line in, a message ready to send or an invalid result out.

    line bytes -> parse and validate (composed, raw or templated job)
               -> render the template (templated jobs) -> unsubscribe headers
               -> attachment files -> build (dispatcher.compose.mime) -> DKIM signature

``Composer(settings, base_dir=..., attachments_root=...).compose(line)`` does all of
it and returns ``Ready`` or ``Invalid``; it touches no shared state, so ``run``,
``enqueue`` and ``worker`` use it alike, in any thread. It blocks (attachment files,
RSA): call it off the event loop when ``off_loop(job)`` says so.

``run`` and ``enqueue`` check the job's id (resume, duplicates) between the two halves,
``parse`` and ``finish``: a line whose id an earlier run finished is never rendered,
read or signed again.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

from pydantic import ValidationError

from dispatcher.compose.jobs import (
    ComposedJob,
    Job,
    JobError,
    Line,
    Outgoing,
    RawJob,
    build,
    load_attachments,
    parse_line,
    validation_error,
    with_default_headers,
)
from dispatcher.compose.templates import (
    TemplatedJob,
    TemplateError,
    Templates,
    Unsubscribe,
    job_context,
    merge_unsubscribe,
)
from dispatcher.config import Settings
from dispatcher.loop.verp import ReturnPath
from pool.dkim import sign_all, signers_from_settings

AnyJob = Job | TemplatedJob


@dataclass(frozen=True, slots=True)
class Ready:
    """A message to hand to the pool."""

    line: int
    job_id: str
    outgoing: Outgoing


@dataclass(frozen=True, slots=True)
class Done:
    """A line whose id an earlier run finished: parsed, not composed (``compose(done=)``)."""

    line: int
    job_id: str


@dataclass(frozen=True, slots=True)
class Invalid:
    """A line that cannot be sent. ``error.job_id`` is its id when readable;
    ``parsed``: the line is a valid job (its id is its own) that failed later, when
    rendered, read, built or signed."""

    line: int
    error: JobError
    parsed: bool

    @property
    def message(self) -> str:
        """The results file's ``error``: ``line N: field: what``."""
        return f"line {self.line}: {self.error}"


class Composer:
    """The compose stage for one configuration.

    Templates are compiled once per Composer (one per process); the DKIM keys and the
    unsubscribe templates are read once, here; each DKIM key adds its own signature.
    ``sign=False`` leaves messages unsigned (``enqueue`` only validates). ``batch``
    names the batch, from which Message-IDs are derived (``dispatcher.compose.jobs.build``). Raises
    ValueError, one line naming the setting, when a DKIM key or an unsubscribe template
    cannot be used.
    """

    def __init__(self, settings: Settings, *, base_dir: Path, attachments_root: Path, sign: bool = True,
                 batch: str | None = None) -> None:
        self.base_dir = base_dir
        self.batch = batch
        self.attachments_root = attachments_root
        self.default_from = settings.jobs.default_from
        self.default_headers = settings.jobs.headers
        self.templates = Templates.from_settings(settings.templates)
        self.unsubscribe = Unsubscribe.from_settings(settings.unsubscribe)
        self.signers = signers_from_settings(settings.dkim) if sign else []
        self.compose_processes = settings.jobs.compose_processes  # None: dispatcher.compose.process decides
        path = settings.jobs.return_path
        self.return_path = ReturnPath(path) if path is not None else None  # VERP (dispatcher.loop.verp)

    @overload
    def compose(self, line: Line) -> Ready | Invalid: ...
    @overload
    def compose(self, line: Line, done: Callable[[str], bool]) -> Ready | Invalid | Done: ...

    def compose(self, line: Line, done: Callable[[str], bool] | None = None) -> Ready | Invalid | Done:
        """Everything: line -> Ready or Invalid. Never raises for what a line holds.
        ``done(id)`` true: an earlier run finished the job, which is then not rendered,
        read or signed again (``Done``)."""
        try:
            job = self.parse(line)
        except JobError as exc:
            return Invalid(line.number, exc, parsed=False)
        if done is not None and done(job.id):
            return Done(line.number, job.id)
        try:
            return Ready(line.number, job.id, self.finish(job))
        except JobError as exc:
            return Invalid(line.number, exc, parsed=True)

    def parse(self, line: Line) -> AnyJob:
        """Validate the line into a job (cheap: no template, file or key). Raises JobError."""
        return parse_line(line)

    def off_loop(self, job: AnyJob) -> bool:
        """``finish(job)`` blocks: it reads attachment files or signs."""
        return bool(self.signers) or reads_files(job)

    def finish(self, job: AnyJob) -> Outgoing:
        """Render, add unsubscribe headers, read attachments, build and sign ``job``.
        Raises JobError naming the field (``template``, ``data.KEY``, ``attachments.N.path``,
        ``raw``...), with the job's id."""
        try:
            ready = self._resolve(job)
            if self.default_headers and isinstance(ready, ComposedJob):
                ready.headers = with_default_headers(ready.headers, self.default_headers)
            load_attachments(ready, self.base_dir, self.attachments_root)
            outgoing = build(ready, batch=self.batch)
        except JobError as exc:
            exc.job_id = job.id
            raise
        if self.return_path is not None and not isinstance(ready, RawJob):  # a raw job keeps its mail_from
            outgoing.sender = self.return_path.render(job.id)
        if self.signers:
            try:
                outgoing.message = sign_all(self.signers, outgoing.message, prepared=outgoing.prepared)
                outgoing.prepared = True  # the signer writes CRLF line endings only
            except ValueError as exc:  # only a raw message can lack From or hold a broken header
                raise JobError("raw", str(exc).removeprefix("message: "), job.id) from None
        return outgoing

    def check(self, job: AnyJob) -> None:
        """What ``enqueue`` validates: all of ``finish`` but reading attachment files
        (the worker's to read) and signing. Raises JobError."""
        ready = self._resolve(job)
        if not reads_files(ready):
            build(ready)

    def _resolve(self, job: AnyJob) -> Job:
        """A templated job rendered into a composed one; unsubscribe headers on every
        composed job; a raw job as it is."""
        if isinstance(job, RawJob):
            return job
        try:
            if isinstance(job, TemplatedJob):
                document = self.templates.compose(job, default_from=self.default_from, unsubscribe=self.unsubscribe)
                try:
                    return ComposedJob.model_validate(document)
                except ValidationError as exc:
                    raise validation_error(exc, job.id) from None
            if self.unsubscribe is not None:
                job.headers = merge_unsubscribe(job.headers, self.unsubscribe.headers(_context(job)))
            return job
        except TemplateError as exc:
            raise JobError(exc.field, exc.message, job.id) from None


def reads_files(job: AnyJob) -> bool:
    """The job has attachments given by ``path``."""
    for attachment in getattr(job, "attachments", None) or ():
        if (attachment.get("path") if isinstance(attachment, dict) else attachment.path) is not None:
            return True
    return False


def _context(job: ComposedJob) -> dict[str, Any]:
    """The template variables of a composed job (for the unsubscribe URL)."""
    fields: dict[str, Any] = {"id": job.id, "from": job.from_, "to": job.to, "cc": job.cc, "bcc": job.bcc,
                              "subject": job.subject, "headers": job.headers}
    if job.reply_to is not None:
        fields["reply_to"] = job.reply_to
    return job_context(fields)
