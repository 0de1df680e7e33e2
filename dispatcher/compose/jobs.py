"""Jobs: the JSON Lines reader, the job models (docs/run.md) and message building."""

from __future__ import annotations

import base64
import binascii
import json
import mimetypes
import os
import re
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Annotated, Any

import orjson
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from dispatcher.compose.address import parse_address, parse_mailbox
from dispatcher.compose.mime import MessageError, build_message, derived_message_id
from dispatcher.compose.templates import TemplatedJob
from pool import Envelope
from pool.envelope import check_headers, crlf

#: Longer lines are rejected without being held in memory.
MAX_LINE_BYTES = 16 * 1024 * 1024

_HEADER_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 section 2.2: printable ASCII but ':'
_RESERVED_HEADERS = {"from", "to", "cc", "bcc", "subject", "reply-to", "content-type",
                     "content-transfer-encoding", "mime-version"}
#: Written by the relays (Return-Path, Received) or the signer: a job's own would forge them.
_FORBIDDEN_HEADERS = {"return-path", "received", "dkim-signature"}
#: Structured headers are written as given, never as RFC 2047 encoded words (RFC 2047
#: section 5, RFC 2369, RFC 8058): a value must be printable ASCII, folded at spaces.
_STRUCTURED_HEADERS = {"message-id", "in-reply-to", "references"}
_STRUCTURED_VALUE = re.compile(r"[!-~]{1,900}(?:[ \t]+[!-~]{1,900})*")
_MSG_ID = re.compile(r"<[^<>@\s]+@[^<>@\s]+>")
_LIST_URIS = re.compile(r"<(?:https?|mailto):[!-;=?-~]+>(?:[ \t]*,[ \t]*<(?:https?|mailto):[!-;=?-~]+>)*")
#: RFC 5322 section 3.3 date-time (the obsolete forms aside).
_DATE = re.compile(r"(?:(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), )?\d{1,2} (?:Jan|Feb|Mar|Apr|May|Jun|Jul|Aug|Sep|Oct|Nov|Dec) "
                   r"\d{4} \d{2}:\d{2}(?::\d{2})? [+-]\d{4}")


class JobError(ValueError):
    """A job line that cannot be sent; ``field`` names what is wrong."""

    def __init__(self, field: str, message: str, job_id: str | None = None) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field
        self.job_id = job_id  # when the line's id could still be read

    @classmethod
    def restore(cls, field: str, text: str, job_id: str | None) -> JobError:
        """The error whose ``field``, ``str()`` and ``job_id`` these are (from another process)."""
        error = cls(field, "", job_id)
        error.args = (text,)
        return error


def _no_newlines(value: str) -> str:
    if "\r" in value or "\n" in value:
        raise ValueError("contains CR or LF (header injection)")
    return value


_UNFOLDABLE = re.compile(r"\S{900}")


def _header_text(value: str) -> str:
    _no_newlines(value)
    if value.isascii() and _UNFOLDABLE.search(value):
        # Headers fold only at white space; SMTP lines end at 998 octets (RFC 5322 2.1.1).
        raise ValueError("has a word of 900 or more characters, too long for one SMTP line")
    return value


def _mailbox(value: str) -> str:
    """``addr@example.org`` or ``Name <addr@example.org>``, strictly (``dispatcher.compose.address``);
    returns it as given."""
    parse_mailbox(value)
    return value


def _bare_address(value: str) -> str:
    parse_address(value)
    return value


Mailbox = Annotated[str, AfterValidator(_mailbox)]
Address = Annotated[str, AfterValidator(_bare_address)]
HeaderText = Annotated[str, AfterValidator(_header_text)]
JobId = Annotated[str, Field(min_length=1, max_length=1000), AfterValidator(_no_newlines)]


class Attachment(BaseModel):
    model_config = ConfigDict(extra="forbid")
    filename: HeaderText = Field(min_length=1)
    content_type: HeaderText | None = None
    path: str | None = None
    content_base64: str | None = None
    _data: bytes | None = PrivateAttr(default=None)  # the file's bytes, read off the event loop

    @model_validator(mode="after")
    def _one_source(self) -> Attachment:
        if (self.path is None) == (self.content_base64 is None):
            raise ValueError("give exactly one of path or content_base64")
        return self


class ComposedJob(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: JobId
    from_: Mailbox = Field(alias="from")
    to: list[Mailbox] = Field(min_length=1)
    cc: list[Mailbox] = Field(default_factory=list)  # a factory: pydantic deep-copies a [] default
    bcc: list[Mailbox] = Field(default_factory=list)
    reply_to: Mailbox | None = None
    subject: HeaderText
    text: str | None = None
    html: str | None = None
    headers: dict[str, HeaderText] = Field(default_factory=dict)
    attachments: list[Attachment] = Field(default_factory=list)

    @model_validator(mode="after")
    def _header_names(self) -> ComposedJob:
        if self.headers:
            check_custom_headers(self.headers)
        return self


def check_custom_headers(headers: Mapping[str, str]) -> None:
    """Raise ValueError (``headers.NAME: ...``) unless ``headers`` may be added to a
    composed message as they are: a job's ``headers`` or the config's ``jobs.headers``."""
    seen: set[str] = set()
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"headers: {name!r} is not a valid header name")
        lower = name.lower()
        if lower in _RESERVED_HEADERS:
            raise ValueError(f"headers: {name!r} is set from the job's own fields")
        if lower in _FORBIDDEN_HEADERS:
            raise ValueError(f"headers.{name}: written by relays and signers, never by a job")
        if lower in seen:
            raise ValueError(f"headers.{name}: given twice (names are compared case-insensitively)")
        seen.add(lower)
        _header_text(value)
        _check_header(name, lower, value)


def with_default_headers(headers: Mapping[str, str], defaults: Mapping[str, str]) -> dict[str, str]:
    """``headers`` plus each of ``defaults`` (``jobs.headers``) it does not set itself
    (names compared case-insensitively)."""
    names = {name.lower() for name in headers}
    return {**{name: value for name, value in defaults.items() if name.lower() not in names}, **headers}


def _check_header(name: str, lower: str, value: str) -> None:
    """A custom header's value where its name says what it must be. Raises ValueError."""
    if lower == "date" and not _DATE.fullmatch(value):
        raise ValueError(f"headers.{name}: {value[:60]!r} is not an RFC 5322 date (Mon, 1 Jan 2024 09:00:00 +0000)")
    if lower in _STRUCTURED_HEADERS or lower.startswith("list-"):
        if not _STRUCTURED_VALUE.fullmatch(value):
            raise ValueError(f"headers.{name}: a structured header must be printable ASCII words of at most "
                             "900 characters, as it is sent (never encoded)")
        if lower == "message-id" and not _MSG_ID.fullmatch(value):
            raise ValueError(f"headers.{name}: {value[:60]!r} is not <id@domain>")
        if lower == "list-unsubscribe" and not _LIST_URIS.fullmatch(value):
            raise ValueError(f"headers.{name}: must be <https:...> and/or <mailto:...> URIs (RFC 2369, RFC 8058)")


class RawJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: JobId
    mail_from: Address
    rcpt_to: list[Address] = Field(min_length=1)
    raw: str = Field(min_length=1)


Job = ComposedJob | RawJob


@dataclass(slots=True)
class Line:
    """One line of the jobs file: its 1-based number and bytes (None: too long)."""

    number: int
    content: bytes | None
    size: int = 0  # bytes the line took in the file


_BOM = b"\xef\xbb\xbf"


class LineSplitter:
    """Cuts a byte stream, fed in chunks of any size, into ``Line``s.

    Never holds more than ``max_bytes`` of one line: a longer line is discarded as it
    arrives and comes out with ``content=None``. Blank lines are skipped but counted,
    so numbers match an editor's. A UTF-8 byte order mark at the very start is dropped.
    """

    def __init__(self, max_bytes: int = MAX_LINE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._number = 0
        self.blank = 0  # blank lines skipped so far
        self._parts: list[bytes] = []  # the line being read, when a chunk ended inside it
        self._held = 0
        self._overlong = False

    def feed(self, chunk: bytes) -> list[Line]:
        lines: list[Line] = []
        start = 0
        while (end := chunk.find(b"\n", start)) >= 0:
            line = self._line(chunk[start:end + 1])
            if line is not None:
                lines.append(line)
            start = end + 1
        if start < len(chunk):
            self._hold(chunk[start:])
        return lines

    def end(self) -> list[Line]:
        """The last line when the stream does not end with a newline."""
        if not self._parts and not self._overlong:
            return []
        line = self._line(b"")
        return [line] if line is not None else []

    def _hold(self, part: bytes) -> None:
        self._held += len(part)
        if not self._overlong:
            self._parts.append(part)
            if self._held > self.max_bytes:
                self._overlong, self._parts = True, []

    def _line(self, tail: bytes) -> Line | None:
        self._number += 1
        size = self._held + len(tail)
        if self._overlong or size - tail.endswith(b"\n") > self.max_bytes:
            content = None
        elif self._parts:
            content = b"".join((*self._parts, tail))
        else:
            content = tail
        self._parts, self._held, self._overlong = [], 0, False
        if content is not None:
            if self._number == 1 and content.startswith(_BOM):
                content = content[len(_BOM):]
            if not content.strip():
                self.blank += 1
                return None
        return Line(self._number, content, size)


def read_lines(stream: IO[bytes], max_bytes: int = MAX_LINE_BYTES, chunk_size: int = 1 << 20) -> Iterator[Line]:
    """Stream the lines of a binary file (blocking reads; see ``LineSplitter``)."""
    splitter = LineSplitter(max_bytes)
    while chunk := stream.read(chunk_size):
        yield from splitter.feed(chunk)
    yield from splitter.end()


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p not in ("ComposedJob", "RawJob", "TemplatedJob")]
    return ".".join("from" if p == "from_" else p for p in parts)


def _readable_id(value: Any) -> str | None:
    """The id when it is one a result can be keyed by, else None."""
    if isinstance(value, str) and 0 < len(value) <= 1000 and "\r" not in value and "\n" not in value:
        return value
    return None


def parse_job(line: Line) -> Job:
    """Validate one line into a job ``build`` takes: composed or raw. A templated line
    is an error here: ``dispatcher.compose.stage`` renders it (``parse_line``). Raises JobError
    naming the field (and the id when it is readable). Never raises anything else."""
    job = parse_line(line)
    if isinstance(job, TemplatedJob):
        raise JobError("template", "a templated job is rendered by the compose stage", job.id)
    return job


def parse_line(line: Line) -> Job | TemplatedJob:
    """Validate one line: a composed, raw or templated job (``template``). Raises
    JobError naming the field (and the id when it is readable). Never raises anything
    else, whatever the bytes."""
    if line.content is None:
        raise JobError("", f"line longer than {MAX_LINE_BYTES} bytes")
    document = _fast_json(line.content)
    if document is None:  # not plain RFC 8259 JSON: the standard library says why, or reads it
        try:
            text = line.content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise JobError("", f"not valid UTF-8 (byte {exc.start + 1} of the line)") from None
        try:
            document = json.loads(text)
        except RecursionError:
            raise JobError("", "not valid JSON: nested too deeply") from None
        except ValueError as exc:  # JSONDecodeError, or an integer too long to convert
            raise JobError("", f"not valid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise JobError("", "a job must be a JSON object")
    if isinstance(document.get("id"), int) and not isinstance(document.get("id"), bool):
        document["id"] = str(document["id"])
    job_id = _readable_id(document.get("id"))
    model: type[BaseModel]
    if "template" in document:
        model = TemplatedJob
    elif "raw" in document or "mail_from" in document:
        model = RawJob
    else:
        model = ComposedJob
    try:
        return model.model_validate(document)
    except RecursionError:
        raise JobError("", "nested too deeply", job_id) from None
    except ValidationError as exc:
        raise validation_error(exc, job_id) from None


_INT64 = float(1 << 63)


def _fast_json(content: bytes) -> Any:
    """The line's document by orjson (4x the standard library), or None when orjson
    refuses it or could read it differently: NaN, lone surrogates and invalid UTF-8 are
    errors to orjson only, and orjson turns an integer beyond 64 bits into a float
    (``json`` keeps it exact), so a document holding a float that large is read again
    too. The standard library then decides, as it always did. (Looking for the float
    in the document costs ~1 µs; searching the line's bytes for 19 digits cost ~18.)"""
    try:
        document = orjson.loads(content)
    except orjson.JSONDecodeError:
        return None
    return None if _holds_huge_float(document) else document


def _holds_huge_float(document: Any) -> bool:
    """A float of magnitude 2**63 or more anywhere in ``document`` (iterative: orjson
    nests up to 1024 levels)."""
    stack = [document]
    while stack:
        node = stack.pop()
        kind = type(node)
        if kind is dict:
            stack.extend(node.values())
        elif kind is list:
            stack.extend(node)
        elif kind is float and not -_INT64 < node < _INT64:
            return True
    return False


def validation_error(exc: ValidationError, job_id: str | None) -> JobError:
    """The JobError for a job model's first validation error, naming its field."""
    first = exc.errors()[0]
    field = _field(first["loc"])
    message = "field required" if first["type"] == "missing" else first["msg"]
    message = message.removeprefix("Value error, ")
    if not field and message.startswith("headers."):  # a model check naming one header
        field, _, message = message.partition(": ")
    if first["type"] == "extra_forbidden":
        message = "unknown field"
    return JobError(field, message, job_id)


def needs_files(job: Job) -> bool:
    """The job has attachments to read from files (see ``load_attachments``)."""
    return any(a.path is not None for a in getattr(job, "attachments", ()))


def load_attachments(job: Job, base: Path, root: Path) -> None:
    """Read every attachment ``path`` of ``job`` (blocking: call it in a thread).

    A path is taken relative to ``base`` (the jobs file's directory); once symlinks are
    resolved it must be inside ``root``, and name a regular file (a FIFO or device is
    never opened for a blocking read). Raises JobError naming ``attachments.N.path``.
    """
    for i, attachment in enumerate(getattr(job, "attachments", ())):
        if attachment.path is not None:
            attachment._data = read_attachment(attachment.path, f"attachments.{i}.path", base, root)


def read_attachment(path: str, field: str, base: Path, root: Path) -> bytes:
    """The bytes of the regular file ``path`` (see ``load_attachments``)."""
    target = os.path.realpath(os.path.join(base, path))
    inside = os.path.realpath(root)
    if os.path.commonpath([target, inside]) != inside:
        raise JobError(field, f"{path!r} is outside the attachments root {str(root)!r}")
    try:
        fd = os.open(target, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError as exc:
        raise JobError(field, f"cannot read {path!r}: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise JobError(field, f"{path!r} is not a regular file")
        with open(fd, "rb", closefd=False) as file:
            return file.read()
    except OSError as exc:
        raise JobError(field, f"cannot read {path!r}: {exc.strerror}") from None
    finally:
        os.close(fd)


@dataclass(slots=True)
class Outgoing:
    """What the pool is given for one job."""

    message: bytes
    sender: str
    recipients: list[str]
    prepared: bool = False  # CRLF only and CRLF-terminated (dispatcher.compose.mime, DKIM): see SMTPPool.submit
    envelope: Envelope | None = None  # made ahead by pool.prepare (the compose process): submit it as it is


def build(job: Job, *, batch: str | None = None) -> Outgoing:
    """The message and envelope of a job. Raises JobError (e.g. unreadable attachment).

    ``batch`` names the batch (the results file, the stream): a composed job without its
    own Message-ID then gets one derived from its id and the batch, the same whenever
    it is sent again (``dispatcher.compose.mime.derived_message_id``); None: a random one.

    Composed jobs are rendered by ``dispatcher.compose.mime`` straight to bytes: valid SMTP
    whatever the values (lines within 998 octets, 7-bit) and ~10 times faster than
    the standard library's MIME classes.
    """
    if isinstance(job, RawJob):
        try:
            raw = job.raw.encode("utf-8")
            check_headers(crlf(raw))
        except UnicodeEncodeError:
            raise JobError("raw", "is not valid Unicode (a lone surrogate)") from None
        except ValueError as exc:
            raise JobError("raw", str(exc).removeprefix("message: ")) from None
        rcpt_to = [parse_address(a).address for a in job.rcpt_to]
        return Outgoing(raw, parse_address(job.mail_from).address, list(dict.fromkeys(rcpt_to)))
    attachments = [_attachment(a, f"attachments.{i}") for i, a in enumerate(job.attachments)]
    sender = parse_mailbox(job.from_).address
    message_id = None if batch is None else derived_message_id(job.id, batch, sender.rpartition("@")[2])
    try:
        message = build_message(from_=job.from_, to=job.to, cc=job.cc, reply_to=job.reply_to, subject=job.subject,
                                text=job.text, html=job.html, headers=job.headers, attachments=attachments,
                                message_id=message_id)
    except MessageError as exc:
        raise JobError(exc.field, str(exc)) from None
    if not message.endswith(b"\r\n"):
        message += b"\r\n"  # what SMTP adds to it anyway (RFC 5321 section 4.1.1.4); a prepared message ends so
    recipients = [parse_mailbox(a).address for a in (*job.to, *job.cc, *job.bcc)]
    return Outgoing(message, sender, list(dict.fromkeys(recipients)), prepared=True)


def _attachment(attachment: Attachment, field: str) -> tuple[str, str, bytes]:
    """(filename, content type, content) of an attachment; the type guessed from the
    filename when not given."""
    payload = _attachment_bytes(attachment, field)
    content_type = attachment.content_type or mimetypes.guess_type(attachment.filename)[0]
    return attachment.filename, content_type or "application/octet-stream", payload


def _attachment_bytes(attachment: Attachment, field: str) -> bytes:
    if attachment.path is not None:
        if attachment._data is None:  # not loaded by the runner: the same rules from here
            cwd = Path.cwd()
            attachment._data = read_attachment(attachment.path, f"{field}.path", cwd, cwd)
        return attachment._data
    try:
        return base64.b64decode(attachment.content_base64 or "", validate=True)
    except (binascii.Error, ValueError):
        raise JobError(f"{field}.content_base64", "not valid base64") from None
