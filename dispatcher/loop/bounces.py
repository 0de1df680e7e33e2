"""``dispatcher bounces``: delivery reports and complaints into the suppression list.

    message -> classify -> Report per recipient -> suppress (hard bounce, complaint) -> mark seen

Classification, most certain first:

1. RFC 3464 delivery status notifications (``multipart/report;
   report-type=delivery-status``): one report per recipient block. ``Action: failed``
   with a 5.x.x status is a ``bounce`` (suppressed when 5.1.x or 5.2.1, as at send time);
   ``delayed`` or 4.x.x is a ``delay``.
2. RFC 5965 abuse reports (``report-type=feedback-report``): a ``complaint``, suppressed
   unless the feedback type is ``not-spam``.
3. Auto-replies (RFC 3834 ``Auto-Submitted``, vacation headers and subjects): ``auto_reply``,
   never suppressed.
4. Non-standard bounces (Exim's default, Yahoo's, old Exchange): ``flufl.bounce``'s
   detectors find the addresses; such a bounce suppresses only when its text carries a
   5.1.x/5.2.1 status, or says plainly that the mailbox does not exist.
5. Anything else is ``unknown``: reported, never suppressed, never touched.

A report is matched to its job by the DSN's ENVID (``Original-Envelope-Id``, the job id
the run sent), by the VERP return path it came back to (``jobs.return_path``), and its
recipient by ORCPT (``Original-Recipient``) or ``Final-Recipient``.
"""

from __future__ import annotations

import dataclasses
import email
import email.policy
import imaplib
import mailbox
import os
import re
import ssl
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email.message import Message
from email.utils import getaddresses, parseaddr
from enum import StrEnum
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlsplit

from dispatcher.loop.suppression import Reason, Record, is_hard_bounce
from dispatcher.loop.verp import ReturnPath


class Kind(StrEnum):
    BOUNCE = "bounce"
    DELAY = "delay"
    COMPLAINT = "complaint"
    AUTO_REPLY = "auto_reply"
    UNKNOWN = "unknown"


@dataclass(frozen=True, slots=True)
class Report:
    """One line of ``dispatcher bounces``' output."""

    type: Kind
    recipient: str | None
    status: str | None  # the enhanced status (5.1.1), or the complaint's feedback type
    diagnostic: str | None
    job_id: str | None
    message_id: str | None  # of the message that bounced, when returned
    action: str  # "suppressed" (or would be, with --dry-run) | "ignored"
    source: str = ""

    @property
    def suppresses(self) -> bool:
        return self.action == "suppressed"

    def as_dict(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["type"] = self.type.value
        return row

    def record(self) -> Record:
        reason = Reason.COMPLAINT if self.type is Kind.COMPLAINT else Reason.HARD_BOUNCE
        detail = " ".join(x for x in (self.status, self.diagnostic) if x) or None
        assert self.recipient is not None
        return Record(self.recipient, reason, f"bounces {self.source}"[:500], self.job_id,
                      detail[:1000] if detail else None)


# -- classification ------------------------------------------------------------------


def classify(raw: bytes, return_path: ReturnPath | None = None) -> list[Report]:
    """The reports in one message (at least one: ``unknown`` when nothing is recognised)."""
    msg = email.message_from_bytes(raw, policy=email.policy.compat32)
    job_from_verp = _verp_job(msg, return_path)
    report_type = (msg.get_param("report-type") or "") if msg.get_content_type() == "multipart/report" else ""
    if isinstance(report_type, tuple):
        report_type = report_type[2]
    report_type = str(report_type).lower()
    if report_type == "delivery-status" or _part(msg, "message/delivery-status") is not None:
        reports = _dsn(msg, job_from_verp)
        if reports:
            return reports
    if report_type == "feedback-report" or _part(msg, "message/feedback-report") is not None:
        reports = _arf(msg, job_from_verp, return_path)
        if reports:
            return reports
    if _auto_reply(msg):
        return [Report(Kind.AUTO_REPLY, _sender(msg), None, _subject(msg), job_from_verp, None, "ignored")]
    reports = _non_standard(msg, job_from_verp)
    if reports:
        return reports
    return [Report(Kind.UNKNOWN, None, None, _subject(msg), job_from_verp, None, "ignored")]


def _part(msg: Message, content_type: str) -> Message | None:
    for part in msg.walk():
        if part.get_content_type() == content_type:
            return part
    return None


def _returned(msg: Message) -> Message | None:
    """The returned message (or its headers) inside a report."""
    for part in msg.walk():
        kind = part.get_content_type()
        if kind in ("message/rfc822", "message/global"):
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                return payload[0]
        if kind in ("text/rfc822-headers", "message/global-headers", "text/rfc822-header"):
            text = part.get_payload(decode=True)
            if isinstance(text, bytes):
                return email.message_from_bytes(text, policy=email.policy.compat32)
    return None


def _blocks(status_part: Message) -> list[Message]:
    """The field blocks of a message/delivery-status part (per-message first)."""
    payload = status_part.get_payload()
    if isinstance(payload, list):
        return [p for p in payload if isinstance(p, Message)]
    # Some generators leave it as text: parse the blank-line separated blocks.
    text = payload if isinstance(payload, str) else ""
    return [email.message_from_string(b.strip() + "\n", policy=email.policy.compat32)
            for b in re.split(r"\r?\n\s*\r?\n", text) if b.strip()]


def _address_field(value: str | None) -> str | None:
    """``rfc822;ada@example.net`` -> ``ada@example.net`` (xtext decoded, RFC 3461 section 4)."""
    if not value:
        return None
    kind, _, address = str(value).partition(";")
    if not address:
        address = kind
    address = xtext_decode(address.strip()).strip().strip("<>")
    return address or None


def _dsn(msg: Message, job_from_verp: str | None) -> list[Report]:
    part = _part(msg, "message/delivery-status")
    blocks = _blocks(part) if part is not None else []
    if not blocks:
        return []
    envid = blocks[0].get("Original-Envelope-Id")  # the per-message block
    job_id = xtext_decode(str(envid).strip()) if envid else job_from_verp
    message_id = _message_id(_returned(msg))
    reports = []
    for block in blocks[1:] or blocks:  # one block per recipient after it
        recipient = _address_field(block.get("Original-Recipient")) or _address_field(block.get("Final-Recipient"))
        if recipient is not None:
            status, diagnostic = _dsn_status(block)
            kind = _dsn_kind(str(block.get("Action", "")).strip().lower(), status)
            suppress = kind is Kind.BOUNCE and is_hard_bounce(status)
            reports.append(Report(kind, recipient, status, diagnostic, job_id, message_id,
                                  "suppressed" if suppress else "ignored"))
    return reports


def _dsn_status(block: Message) -> tuple[str | None, str | None]:
    """A recipient block's status code and diagnostic. Exim writes ``Status: 5.0.0`` and
    the real code only in the diagnostic (``smtp; 550 5.1.1 ...``): that one wins."""
    status = _status(block.get("Status"))
    diagnostic = _clean(block.get("Diagnostic-Code"))
    said = _status(diagnostic.partition(";")[2]) if diagnostic else None
    if said is not None and (status is None or (status.endswith(".0.0") and said[0] == status[0])):
        status = said
    return status, diagnostic


_KIND_BY_CLASS = {"5": Kind.BOUNCE, "4": Kind.DELAY}
_KIND_BY_ACTION = {"failed": Kind.BOUNCE, "delayed": Kind.DELAY}


def _dsn_kind(action: str, status: str | None) -> Kind:
    """The status class decides (a "failed" 4.x.x is failed for now: a delay); without
    one, the action; delivered, relayed, expanded are no news for the list."""
    by_class = _KIND_BY_CLASS.get((status or "")[:1])
    return by_class if by_class is not None else _KIND_BY_ACTION.get(action, Kind.UNKNOWN)


_NOT_COMPLAINTS = {"not-spam"}


def _arf(msg: Message, job_from_verp: str | None, return_path: ReturnPath | None) -> list[Report]:
    part = _part(msg, "message/feedback-report")
    if part is None:
        return []
    blocks = _blocks(part)
    fields = blocks[0] if blocks else Message()
    feedback = str(fields.get("Feedback-Type", "abuse")).strip().lower()
    returned = _returned(msg)
    found = _arf_recipients(fields, returned)
    job_id = job_from_verp if job_from_verp is not None else _arf_job(fields, returned, return_path)
    agent = _clean(fields.get("User-Agent"))
    action = "ignored" if feedback in _NOT_COMPLAINTS else "suppressed"
    if not found:
        return [Report(Kind.COMPLAINT, None, feedback, agent, job_id, _message_id(returned), "ignored")]
    return [Report(Kind.COMPLAINT, r, feedback, agent, job_id, _message_id(returned), action) for r in found]


def _arf_recipients(fields: Message, returned: Message | None) -> list[str]:
    """Who complained: Original-Rcpt-To, or, since many providers redact it, the To of
    the returned message."""
    found = [r for v in fields.get_all("Original-Rcpt-To", []) if (r := _address_field(v))]
    if not found and returned is not None:
        found = [a for _, a in getaddresses([str(v) for v in returned.get_all("To", [])]) if "@" in a]
    return found


def _arf_job(fields: Message, returned: Message | None, return_path: ReturnPath | None) -> str | None:
    """The job of a complaint sent to the feedback address, not the VERP one: from the
    VERP sender it names (Original-Mail-From, or the returned Return-Path)."""
    if return_path is None:
        return None
    senders = [str(v) for v in fields.get_all("Original-Mail-From", [])]
    if returned is not None:
        senders += [str(v) for v in returned.get_all("Return-Path", [])]
    return next((j for _, a in getaddresses(senders) if (j := return_path.job_id(a)) is not None), None)


_AUTO_SUBJECT = re.compile(r"(?i)^\s*(auto(matic)?[ -]?(reply|response|antwort)|out of (the )?office|"
                           r"abwesenheit|absence|vacation|r[ée]ponse automatique|autoreply|auto:)")


_DAEMON = re.compile(r"(?i)mailer-daemon|postmaster|mail delivery")


def _auto_reply(msg: Message) -> bool:
    """An automatic reply from a person's mailbox (RFC 3834, vacation programs). A
    mailer daemon's bounce says ``Auto-Submitted: auto-replied`` too: not this."""
    if msg.get("X-Autoreply") or msg.get("X-Autorespond") or _AUTO_SUBJECT.match(_subject(msg) or ""):
        return True
    if str(msg.get("Precedence", "")).strip().lower() == "auto_reply":
        return True
    auto = str(msg.get("Auto-Submitted", "")).strip().lower()
    return bool(auto) and auto != "no" and not _DAEMON.search(str(msg.get("From", "")))


# Phrases of non-standard bounces that say the mailbox does not exist.
_NO_MAILBOX = re.compile(r"(?i)(user unknown|unknown user|no such (user|mailbox|recipient)|"
                         r"does(n't| not) (exist|have an? [\w.]+ account)|mailbox (is )?unavailable|"
                         r"invalid (recipient|mailbox|address)|recipient address rejected|address rejected|"
                         r"account (has been )?disabled|mailbox (has been )?disabled)")
_STATUS_IN_TEXT = re.compile(r"\b([45]\.\d{1,3}\.\d{1,3})\b")


def _non_standard(msg: Message, job_from_verp: str | None) -> list[Report]:
    from flufl.bounce import all_failures

    try:
        temporary, permanent = all_failures(msg)
    except Exception:  # a detector tripping over a malformed message is no bounce we know  # noqa: BLE001
        return []
    if not temporary and not permanent:
        return []
    text = _text(msg)
    message_id = _message_id(_returned(msg))
    reports = []
    for raw in sorted(permanent):
        address = raw.decode("utf-8", "replace").strip().strip("<>")
        if "@" not in address:
            continue
        status, diagnostic = _near(text, address)
        hard = is_hard_bounce(status) or (status is None and diagnostic is not None
                                          and _NO_MAILBOX.search(diagnostic) is not None)
        if hard and status is None:
            status = "5.1.1"  # said in words, not in a code
        reports.append(Report(Kind.BOUNCE, address, status, diagnostic, job_from_verp, message_id,
                              "suppressed" if hard else "ignored"))
    for raw in sorted(temporary - permanent):
        address = raw.decode("utf-8", "replace").strip().strip("<>")
        if "@" in address:
            status, diagnostic = _near(text, address)
            reports.append(Report(Kind.DELAY, address, status, diagnostic, job_from_verp, message_id, "ignored"))
    return reports


def _near(text: str, address: str) -> tuple[str | None, str | None]:
    """The status and the reason a non-standard bounce gives for ``address``: the lines
    from the address on (Exim, Yahoo, Exchange write it right after)."""
    at = text.lower().find(address.lower())
    window = text[at:at + 600] if at >= 0 else text[:600]
    lines = [line.strip() for line in window.splitlines() if line.strip()]
    diagnostic = " ".join(lines[:4])[:500] or None
    found = _STATUS_IN_TEXT.search(window)
    return (found.group(1) if found else None), diagnostic


def _text(msg: Message) -> str:
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            payload = part.get_payload(decode=True)
            if isinstance(payload, bytes):
                return payload.decode(part.get_content_charset() or "utf-8", "replace")
    payload = msg.get_payload(decode=True)
    return payload.decode("utf-8", "replace") if isinstance(payload, bytes) else ""


def _verp_job(msg: Message, return_path: ReturnPath | None) -> str | None:
    """The job of the VERP address the report came back to (To, Delivered-To...)."""
    if return_path is None:
        return None
    values = [str(v) for h in ("Delivered-To", "X-Original-To", "Envelope-To", "To", "Return-Path")
              for v in msg.get_all(h, [])]
    for _, address in getaddresses(values):
        job = return_path.job_id(address)
        if job is not None:
            return job
    return None


def _status(value: Any) -> str | None:
    if not value:
        return None
    found = _STATUS_IN_TEXT.search(str(value))
    return found.group(1) if found else None


def _clean(value: Any) -> str | None:
    if value is None:
        return None
    text = " ".join(str(value).split())
    return text[:1000] or None


def _message_id(msg: Message | None) -> str | None:
    if msg is None:
        return None
    value = msg.get("Message-ID") or msg.get("Message-Id")
    return " ".join(str(value).split()) if value else None


def _sender(msg: Message) -> str | None:
    return parseaddr(str(msg.get("From", "")))[1] or None


def _subject(msg: Message) -> str | None:
    value = msg.get("Subject")
    if value is None:
        return None
    try:
        decoded = str(email.header.make_header(email.header.decode_header(str(value))))
    except (ValueError, LookupError, email.errors.HeaderParseError):
        decoded = str(value)
    return " ".join(decoded.split())[:200]


_XTEXT = re.compile(rb"\+([0-9A-Fa-f]{2})")


def xtext_decode(text: str) -> str:
    """RFC 3461 section 4: ``+XX`` is the byte XX."""
    if "+" not in text:
        return text
    raw = _XTEXT.sub(lambda m: bytes([int(m.group(1), 16)]), text.encode("utf-8", "surrogateescape"))
    return raw.decode("utf-8", "replace")


# -- sources ---------------------------------------------------------------------------


class SourceError(Exception):
    """A source cannot be read: one line naming it."""


@dataclass(slots=True)
class Item:
    """One message of a source, read but not yet marked."""

    key: str
    raw: bytes


class Source(Protocol):
    name: str

    def messages(self) -> Iterator[Item]: ...
    def mark_seen(self, items: Iterable[Item]) -> None: ...
    def close(self) -> None: ...


class MaildirSource:
    """A Maildir: the messages in ``new/`` and those in ``cur/`` without the ``S`` flag.
    Marking seen renames the file into ``cur/`` with ``S`` added (its bytes unchanged)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"maildir:{path}"
        for sub in ("new", "cur", "tmp"):
            if not (path / sub).is_dir():
                raise SourceError(f"{path}: not a Maildir (no {sub}/)")

    def messages(self) -> Iterator[Item]:
        for sub in ("new", "cur"):
            for name in sorted(os.listdir(self.path / sub)):
                if name.startswith("."):
                    continue
                flags = name.partition(":2,")[2] if ":2," in name else ""
                if "S" in flags:
                    continue
                try:
                    raw = (self.path / sub / name).read_bytes()
                except FileNotFoundError:  # moved by another reader meanwhile
                    continue
                yield Item(f"{sub}/{name}", raw)

    def mark_seen(self, items: Iterable[Item]) -> None:
        for item in items:
            sub, _, name = item.key.partition("/")
            base, _, flags = name.partition(":2,")
            new = base + ":2," + "".join(sorted(set(flags) | {"S"}))
            try:
                os.rename(self.path / sub / name, self.path / "cur" / new)
            except FileNotFoundError:
                continue

    def close(self) -> None:
        pass


class MboxSource:
    """An mbox file, locked while read; marking seen sets ``Status: RO`` (the file is
    rewritten by ``mailbox``, every other message copied byte for byte)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.name = f"mbox:{path}"
        if not path.is_file():
            raise SourceError(f"{path}: no such mbox file")
        self._box = mailbox.mbox(path, create=False)
        self._box.lock()

    def messages(self) -> Iterator[Item]:
        for key in self._box.keys():
            msg = self._box.get_message(key)
            if "R" in msg.get_flags():
                continue
            yield Item(str(key), self._box.get_bytes(key, from_=False))

    def mark_seen(self, items: Iterable[Item]) -> None:
        changed = False
        for item in items:
            key: Any = int(item.key)  # mbox keys are ints (typeshed says str)
            msg = self._box.get_message(key)
            msg.add_flag("RO")
            self._box[key] = msg
            changed = True
        if changed:
            self._box.flush()

    def close(self) -> None:
        self._box.unlock()
        self._box.close()


class IMAPSource:
    """``imaps://user@host[:port]/MAILBOX``: the unseen messages, fetched with
    ``BODY.PEEK[]`` (reading does not mark them); marking stores ``\\Seen``."""

    def __init__(self, url: str, password: str | None, *, timeout: float = 30.0,
                 ca_file: Path | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme != "imaps" or not parts.hostname or not parts.username:
            raise SourceError(f"{_redact(url)}: an IMAP source is imaps://user@host[:port]/MAILBOX")
        if password is None:
            raise SourceError(f"{_redact(url)}: bounces.imap_password is not set")
        self.name = _redact(url)
        self.mailbox = unquote(parts.path.lstrip("/")) or "INBOX"
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        try:
            self._imap = imaplib.IMAP4_SSL(parts.hostname, parts.port or 993, ssl_context=context, timeout=timeout)
        except (OSError, imaplib.IMAP4.error) as exc:
            raise SourceError(f"{self.name}: cannot connect: {exc}") from None
        try:
            self._imap.login(unquote(parts.username), password)
            kind, _ = self._imap.select(_quote(self.mailbox))
            if kind != "OK":
                raise SourceError(f"{self.name}: no mailbox {self.mailbox!r}")
        except imaplib.IMAP4.error as exc:
            self.close()
            raise SourceError(f"{self.name}: {_imap_text(exc)}") from None
        except SourceError:
            self.close()
            raise

    def messages(self) -> Iterator[Item]:
        kind, data = self._imap.uid("SEARCH", "UNSEEN")
        if kind != "OK":
            raise SourceError(f"{self.name}: SEARCH failed")
        for uid in (data[0] or b"").decode("ascii").split():
            kind, fetched = self._imap.uid("FETCH", uid, "(BODY.PEEK[])")
            for entry in fetched:
                if isinstance(entry, tuple):
                    yield Item(uid, entry[1])

    def mark_seen(self, items: Iterable[Item]) -> None:
        uids = ",".join(item.key for item in items)
        if uids:
            self._imap.uid("STORE", uids, "+FLAGS.SILENT", "(\\Seen)")

    def close(self) -> None:
        try:
            self._imap.logout()
        except (OSError, imaplib.IMAP4.error):
            pass


def _quote(mailbox_name: str) -> str:
    return '"' + mailbox_name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _imap_text(exc: BaseException) -> str:
    text = exc.args[0] if exc.args else exc
    return text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password:
        return url.replace(f":{parts.password}@", ":***@")
    return url


def open_source(spec: str, *, password: str | None = None, timeout: float = 30.0,
                ca_file: Path | None = None) -> Source:
    """``imaps://...``, a Maildir directory or an mbox file. Raises SourceError."""
    if spec.startswith(("imaps://", "imap://")):
        return IMAPSource(spec, password, timeout=timeout, ca_file=ca_file)
    path = Path(spec)
    if path.is_dir():
        return MaildirSource(path)
    if path.is_file():
        return MboxSource(path)
    raise SourceError(f"{spec}: no such Maildir, mbox file or imaps:// URL")
