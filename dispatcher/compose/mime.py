"""Composed messages as wire-ready bytes (RFC 5322, MIME: RFC 2045-2047 and 2231).

Our own builder because the standard library's is both the slowest stage of a job
(~120 µs for a text message) and not always valid SMTP (header lines over 998 octets;
a folded non-ASCII Subject that decodes with a leading space). The promises:

- every line ends in CRLF and is at most 998 octets, 78 wherever a word allows it;
- the output is 7-bit: non-ASCII header text becomes RFC 2047 encoded words, text that
  is not plain short-lined ASCII is quoted-printable, attachments are base64 (but
  message/* and multipart/* ones, sent as they are: 7bit, or 8bit with 8BITMIME), a
  non-ASCII or long filename is RFC 2231. Only a non-ASCII *address* is written as
  UTF-8 (it cannot be encoded; RFC 6532 needs SMTPUTF8);
- parsed back (``email.policy.default``) the headers and parts equal what was given,
  but for white space in display names (a run is one space, RFC 5322 section 3.2.2;
  and CPython's address parser reads a space between two encoded words, which RFC 2047
  section 6.2 says is not text: a name's word is split only when one encoded word
  cannot hold it) and line breaks in text (CR, LF and CRLF are each one line break).

The caller validates header names and values (``dispatcher.compose.jobs``); mailboxes are
parsed here again, strictly and cached (``dispatcher.compose.address``). Message-ID, In-Reply-To,
References and List-* are structured: written as given, never as encoded words.
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import itertools
import os
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from email.utils import formatdate
from urllib.parse import quote

from dispatcher.compose.address import parse_mailbox

MAX_LINE = 998  # RFC 5322 section 2.1.1, without the CRLF
SOFT_LINE = 78
_MAX_PLAIN_WORD = 800  # longer header words become encoded words (ASCII ones too) so they can fold
_MAX_PLAIN_SPACE = 70
_MAX_NAME = 150  # a header name cannot be folded

_SAFE_ADDRESS = re.compile(r"[^\x00-\x20\x7f<>]+")
_PLAIN_VALUE = re.compile(r"[!-~]+(?:[ \t]+[!-~]+)*")  # printable ASCII, no leading or trailing space
_SINGLE_SPACED = re.compile(r"[!-~]+(?: [!-~]+)*")  # printable ASCII words, one space between two
_PLAIN_WORD = re.compile(r"[!-~]+")
_TOKENS = re.compile(r"[ \t]+|[^ \t]+")
_SEGMENTS = re.compile(r"[^ \t]+[ \t]*|[ \t]+")  # a word and the white space after it
_ATOMS = re.compile(r"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+(?: [A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+)*")
_QUOTABLE = re.compile(r"[!-~]+(?: [!-~]+)*")
_SPACES = re.compile(r"[ \t]+")
_FILENAME = re.compile(r"[!#-\[\]-~]+(?: [!#-\[\]-~]+)*")  # printable ASCII but '"' and '\'
_CONTENT_TYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(?:;[ \t]*[!-~]+(?:[ \t]+[!-~]+)*)?")
_DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]*[A-Za-z0-9])?")

# RFC 2047 section 5(3): the characters an encoded word may show as they are anywhere,
# in a phrase too; space is "_".
_Q_SAFE = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789!*+-/ "
_Q_ASCII = [chr(c) if c in _Q_SAFE else f"={c:02X}" for c in range(128)]
_Q_ASCII[0x20] = "_"
# RFC 2231 attribute-char: what a filename*= value shows as it is.
_ATTRIBUTE_SAFE = "!#$&+-.^_`|~"
_SEVEN_BIT_TEXT = bytes(range(0x20, 0x7F)) + b"\t\n"  # what a 7bit text part shows as it is


class MessageError(ValueError):
    """A value that cannot be written as valid SMTP; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def build_message(
    *,
    from_: str,
    to: Sequence[str],
    cc: Sequence[str] = (),
    reply_to: str | None = None,
    subject: str,
    text: str | None = None,
    html: str | None = None,
    headers: Mapping[str, str] | None = None,
    attachments: Sequence[tuple[str, str, bytes]] = (),
    message_id: str | None = None,
    date: str | None = None,
) -> bytes:
    """The message as bytes, ready for ``SMTPPool.submit`` (which dot-stuffs it).

    ``from_``, ``to``, ``cc`` and ``reply_to`` are mailboxes (``addr`` or
    ``Name <addr>``), already validated; ``headers`` are written after Subject, as
    unstructured text; ``attachments`` are (filename, content type, content). The body
    is ``text``, ``html``, or both as multipart/alternative (neither: empty text), inside
    multipart/mixed when there are attachments. Message-ID and Date are added unless
    given here or in ``headers``. Raises MessageError for a value no line can hold (a
    header name over 150 characters, an address over 900) or that is not valid Unicode.
    """
    out: list[str] = []
    _address_header(out, "From", [from_], "from")
    _address_header(out, "To", to, "to")
    if cc:
        _address_header(out, "Cc", cc, "cc")
    if reply_to:
        _address_header(out, "Reply-To", [reply_to], "reply_to")
    _unstructured_header(out, "Subject", subject, "subject")
    given = set()
    for name, value in (headers or {}).items():
        if len(name) > _MAX_NAME:
            raise MessageError("headers", f"header name of {len(name)} characters: at most {_MAX_NAME}")
        lower = name.lower()
        if lower in _STRUCTURED or lower.startswith("list-"):
            _structured_header(out, name, value, f"headers.{name}")
        else:
            _unstructured_header(out, name, value, f"headers.{name}")
        given.add(lower)
    if "message-id" not in given:
        message_id = message_id or new_message_id(_address(from_, "from")[1].rpartition("@")[2])
        out.append(f"Message-ID: {message_id}\r\n")
    if "date" not in given:
        out.append(f"Date: {date or _now()}\r\n")
    out.append("MIME-Version: 1.0\r\n")

    if text is not None and html is not None:
        body = _multipart("alternative", [_text_part(text, "plain", "text"), _text_part(html, "html", "html")])
    elif html is not None:
        body = _text_part(html, "html", "html")
    else:
        body = _text_part(text or "", "plain", "text")
    if attachments:
        parts = [body]
        for i, (filename, content_type, content) in enumerate(attachments):
            parts.append(_attachment_part(filename, content_type, content, f"attachments.{i}"))
        body = _multipart("mixed", parts)
    head = "".join(out)
    return (head.encode("ascii") if head.isascii() else head.encode("utf-8")) + body


# Message-ID and Date ---------------------------------------------------------------

_unique = secrets.token_hex(8)
_serial = itertools.count(1)
_date_second = -1
_date_text = ""


def _new_process() -> None:  # a forked child must not repeat its parent's Message-IDs
    global _unique, _serial
    _unique, _serial = secrets.token_hex(8), itertools.count(1)


os.register_at_fork(after_in_child=_new_process)


def new_message_id(domain: str) -> str:
    """``<random.serial@domain>``: 64 random bits per process and a counter (make_msgid
    costs a clock read, a random draw and the pid per call)."""
    return f"<{_unique}.{next(_serial)}@{_id_domain(domain)}>"


def derived_message_id(job_id: str, batch: str, domain: str) -> str:
    """``<hash@domain>`` from the job's id and its batch (the results file, the stream):
    a job sent twice (after a crash, by two workers) carries the same Message-ID both
    times, so receivers can collapse the copies, and a results row joins the relay's log.
    The id itself is not shown (it may hold an address): 120 bits of BLAKE2b."""
    digest = hashlib.blake2b(f"{batch}\0{job_id}".encode("utf-8", "surrogatepass"), digest_size=15,
                             person=b"dispatcher-msgid").digest()
    return f"<{digest.hex()}@{_id_domain(domain)}>"  # hex: base64.b32encode is pure Python, 10 µs


@functools.lru_cache(maxsize=1024)
def _id_domain(domain: str) -> str:
    """``domain`` as a Message-ID's right-hand side: ASCII (IDNA), else localhost
    (cached: a campaign has a few sender domains)."""
    if not _DOMAIN.fullmatch(domain):
        try:
            domain = domain.encode("idna").decode("ascii")
        except UnicodeError:
            domain = "localhost"
        if not _DOMAIN.fullmatch(domain):
            domain = "localhost"
    return domain


def _now() -> str:
    """RFC 5322 local date, formatted once a second (formatdate costs ~14 µs)."""
    global _date_second, _date_text
    now = time.time()
    if int(now) != _date_second:
        _date_second, _date_text = int(now), formatdate(int(now), localtime=True)
    return _date_text


# Headers ----------------------------------------------------------------------------


class _Folder:
    """The lines of one header. A word goes on the current line with the white space
    before it while the line stays within 78 octets; else the white space starts the
    next line (folding, RFC 5322 section 2.2.3). The first word always stays on the
    name's line: folding there would make the value start with a space."""

    def __init__(self, name: str) -> None:
        self.lines: list[str] = []
        self.line = name + ":"
        self.first = True

    def add(self, space: str, word: str) -> None:
        if not self.first and len(self.line) + len(space) + len(word) > SOFT_LINE:
            self.fold()
        self.line += space + word
        self.first = False

    def fold(self) -> None:
        self.lines.append(self.line)
        self.line = ""

    def add_encoded(self, space: str, text: str) -> None:
        """``text`` as RFC 2047 encoded words of at most 75 characters. A word of the
        text (with the white space after it) is not split across encoded words unless
        it is too long for one: white space between encoded words is not text (RFC 2047
        section 6.2), and CPython's address parser wrongly reads it as a space."""
        raw = text.encode("utf-8")
        q = len(raw) + 2 * len(raw.translate(None, _Q_SAFE)) <= (len(raw) + 2) // 3 * 4  # the shorter
        cost = _q_cost if q else _utf8_cost
        word, word_cost = "", 0  # the encoded word being filled
        for segment in _SEGMENTS.findall(text):
            segment_cost = cost(segment)
            start = 0  # what is left of a long segment: an index, never a copy (linear time)
            while start < len(segment):
                fresh = self.first or not self.line
                room = min(75, SOFT_LINE - len(self.line) - len(space))
                if fresh:
                    room = max(room, 24)  # one character (12 octets) and the markup (12)
                if _ew_size(word_cost + segment_cost, q) <= room:
                    word, word_cost = word + segment[start:], word_cost + segment_cost
                    break
                if word:
                    self.add(space, _ew(word, q))
                    word, word_cost, space = "", 0, " "
                elif not fresh and (room < 24 or _ew_size(segment_cost, q) <= 75):
                    self.fold()  # the word fits a line of its own, or nothing fits here
                else:  # longer than any encoded word: as much as fits here
                    end, used = start, 0
                    while end < len(segment) and _ew_size(used + cost(segment[end]), q) <= room:
                        used += cost(segment[end])
                        end += 1
                    self.add(space, _ew(segment[start:end], q))
                    start, segment_cost, space = end, segment_cost - used, " "
        if word:
            self.add(space, _ew(word, q))

    def end(self, out: list[str]) -> None:
        self.lines.append(self.line)
        out.append("\r\n".join(self.lines) + "\r\n")


def _q(c: str) -> str:
    return _Q_ASCII[ord(c)] if c < "\x80" else "".join(f"={b:02X}" for b in c.encode("utf-8"))


def _q_cost(text: str) -> int:
    return sum(len(_q(c)) for c in text)


def _utf8_cost(text: str) -> int:
    return len(text.encode("utf-8"))


def _ew_size(cost: int, q: bool) -> int:
    return 12 + (cost if q else (cost + 2) // 3 * 4)


def _ew(text: str, q: bool) -> str:
    if q:
        return "=?utf-8?q?" + "".join(map(_q, text)) + "?="
    return "=?utf-8?b?" + binascii.b2a_base64(text.encode("utf-8"), newline=False).decode("ascii") + "?="


#: Never RFC 2047 encoded (RFC 2047 section 5, RFC 2369, RFC 8058): written as given,
#: folded at white space only.
_STRUCTURED = frozenset({"message-id", "in-reply-to", "references"})


def _structured_header(out: list[str], name: str, value: str, field: str) -> None:
    if len(name) + len(value) < SOFT_LINE - 1 and _SINGLE_SPACED.fullmatch(value):
        out.append(f"{name}: {value}\r\n")  # the common case: what folding would write, on one line
        return
    words = value.split()
    if not value.isascii() or not words or any(len(name) + 2 + len(word) > MAX_LINE for word in words) \
            or not _PLAIN_VALUE.fullmatch(" ".join(words)):
        raise MessageError(field, "a structured header must be printable ASCII words that fit a line, as it is sent")
    folder = _Folder(name)
    for word in words:
        folder.add(" ", word)
    folder.end(out)


def _unstructured_header(out: list[str], name: str, value: str, field: str) -> None:
    if len(name) + len(value) < SOFT_LINE - 1 and _PLAIN_VALUE.fullmatch(value) and "=?" not in value:
        out.append(f"{name}: {value}\r\n")  # the common case
        return
    folder = _Folder(name)
    try:
        _unstructured(folder, value)
    except UnicodeEncodeError:
        raise MessageError(field, "is not valid Unicode (a lone surrogate)") from None
    folder.end(out)


def _unstructured(folder: _Folder, value: str) -> None:
    """Words stay as they are when they can; the rest are encoded words. White space
    that an encoded word would lose (around and between encoded words, at either end
    of the value, or too long for a line) goes inside the encoded text."""
    tokens = _TOKENS.findall(value)
    encode = [False] * len(tokens)
    last = len(tokens) - 1
    for i, token in enumerate(tokens):
        if token[0] in " \t":
            if i == 0 or i == last or len(token) > _MAX_PLAIN_SPACE:
                encode[i] = True
                if i > 0:
                    encode[i - 1] = True
                if i < last:
                    encode[i + 1] = True
        elif len(token) > _MAX_PLAIN_WORD or "=?" in token or not _PLAIN_WORD.fullmatch(token):
            encode[i] = True
    for i in range(1, last):
        if encode[i - 1] and encode[i + 1]:
            encode[i] = True
    space, i = " ", 0
    while i <= last:
        if not encode[i]:
            if tokens[i][0] in " \t":
                space = tokens[i]
            else:
                folder.add(space, tokens[i])
            i += 1
            continue
        j = i
        while j < last and encode[j + 1]:
            j += 1
        folder.add_encoded(space, "".join(tokens[i:j + 1]))
        i = j + 1


def _address(value: str, field: str) -> tuple[str, str]:
    """(display name, address) of a mailbox, parsed strictly (``dispatcher.compose.address``)."""
    try:
        mailbox = parse_mailbox(value)
    except ValueError as exc:
        raise MessageError(field, str(exc)) from None
    return mailbox.name, mailbox.address


def _address_header(out: list[str], name: str, values: Sequence[str], field: str) -> None:
    mailboxes = [_address(v, field if len(values) == 1 else f"{field}.{i}") for i, v in enumerate(values)]
    if len(mailboxes) == 1 and not mailboxes[0][0] and len(mailboxes[0][1]) < SOFT_LINE - 12:
        address = mailboxes[0][1]
        if not _SAFE_ADDRESS.fullmatch(address):
            raise MessageError(field, f"{address!r} is not an address")
        out.append(f"{name}: {address}\r\n")  # the common case
        return
    folder = _Folder(name)
    last = len(mailboxes) - 1
    for i, (display, address) in enumerate(mailboxes):
        if not _SAFE_ADDRESS.fullmatch(address) or len(address) > 900:
            raise MessageError(field, f"{address[:100]!r} is not an address that fits on a line")
        comma = "," if i < last else ""
        display = _SPACES.sub(" ", display).strip(" ")
        if not display:
            folder.add(" ", address + comma)
            continue
        words = display.split(" ")
        if "=?" not in display and _ATOMS.fullmatch(display) and max(map(len, words)) <= 70:
            for word in words:
                folder.add(" ", word)
        elif "=?" not in display and len(display) <= 70 and _QUOTABLE.fullmatch(display):
            folder.add(" ", '"' + display.replace("\\", "\\\\").replace('"', '\\"') + '"')
        else:
            try:
                folder.add_encoded(" ", display)
            except UnicodeEncodeError:
                raise MessageError(field, "is not valid Unicode (a lone surrogate)") from None
        folder.add(" ", f"<{address}>{comma}")
    folder.end(out)


# Body -------------------------------------------------------------------------------

_boundaries = itertools.count(1)


def _text_part(content: str, subtype: str, field: str) -> bytes:
    """Headers and body of one text part: 7bit when it is printable ASCII (tabs and
    line breaks too) in lines within 998 octets, else quoted-printable UTF-8 (lines of
    76 octets; white space at the end of a line kept)."""
    if "\r" in content:
        content = content.replace("\r\n", "\n").replace("\r", "\n")
    try:
        raw = content.encode("utf-8")
    except UnicodeEncodeError:
        raise MessageError(field, "is not valid Unicode (a lone surrogate)") from None
    if not raw.translate(None, _SEVEN_BIT_TEXT) and _short_lines(raw):
        return (f"Content-Type: text/{subtype}; charset=\"us-ascii\"\r\n"
                "Content-Transfer-Encoding: 7bit\r\n\r\n").encode("ascii") + raw.replace(b"\n", b"\r\n")
    return (f"Content-Type: text/{subtype}; charset=\"utf-8\"\r\n"
            "Content-Transfer-Encoding: quoted-printable\r\n\r\n").encode("ascii") + (
        binascii.b2a_qp(raw, istext=True).replace(b"\n", b"\r\n"))


def _short_lines(raw: bytes) -> bool:
    """No line of ``raw`` is longer than 998 octets; the search jumps to the last line
    break of each 999-octet window (a regex or a split costs ~3 µs per 2 KB)."""
    start = 0
    while len(raw) - start > MAX_LINE:
        newline = raw.rfind(b"\n", start, start + MAX_LINE + 1)
        if newline < 0:
            return False
        start = newline + 1
    return True


def _multipart(subtype: str, parts: list[bytes]) -> bytes:
    boundary = f"=_{_unique}.{next(_boundaries)}_".encode("ascii")  # "_": no boundary is another's prefix
    # "=_" never occurs in quoted-printable or base64; only a 7bit part could hold it
    while any(boundary in part for part in parts):
        boundary = f"=_{secrets.token_hex(16)}".encode("ascii")
    head = f"Content-Type: multipart/{subtype};\r\n boundary=\"{boundary.decode('ascii')}\"\r\n\r\n"
    delimiter = b"--" + boundary
    return b"".join([head.encode("ascii"), *(delimiter + b"\r\n" + part + b"\r\n" for part in parts),
                     delimiter, b"--\r\n"])


def _attachment_part(filename: str, content_type: str, content: bytes, field: str) -> bytes:
    if len(content_type) > 900 or not _CONTENT_TYPE.fullmatch(content_type):
        raise MessageError(f"{field}.content_type", f"{content_type[:100]!r} is not type/subtype")
    try:
        disposition = _disposition(filename)
    except UnicodeEncodeError:
        raise MessageError(f"{field}.filename", "is not valid Unicode (a lone surrogate)") from None
    if content_type.lower().startswith(("message/", "multipart/")):
        encoding, body = _composite_body(content, field)
    else:
        encoded = binascii.b2a_base64(content, newline=False)
        encoding, body = "base64", b"\r\n".join([encoded[i:i + 76] for i in range(0, len(encoded), 76)])
    head = f"Content-Type: {content_type}\r\nContent-Transfer-Encoding: {encoding}\r\n{disposition}\r\n"
    return head.encode("ascii") + body


def _composite_body(content: bytes, field: str) -> tuple[str, bytes]:
    """A message/* or multipart/* attachment as it is, 7bit or 8bit: RFC 2046 sections
    5.1 and 5.2.1 allow no other encoding (readers take a base64 one for empty). Its
    line breaks become CRLF; an 8bit one needs 8BITMIME on the wire (pool.transaction)."""
    if b"\x00" in content:
        raise MessageError(field, "a message/* or multipart/* attachment cannot hold NUL bytes")
    if b"\r" in content:
        content = content.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    if not _short_lines(content):
        raise MessageError(field, "a message/* or multipart/* attachment has a line over "
                                 f"{MAX_LINE} octets (it cannot be encoded, RFC 2046)")
    if content and not content.endswith(b"\n"):
        content += b"\n"
    return ("7bit" if content.isascii() else "8bit"), content.replace(b"\n", b"\r\n")


def _disposition(filename: str) -> str:
    """Content-Disposition with the filename quoted when it is short printable ASCII,
    else RFC 2231 percent-encoded UTF-8, in numbered sections of whole characters when
    it would not fit one line."""
    if len(filename) <= 50 and _FILENAME.fullmatch(filename) and "=?" not in filename:
        return f"Content-Disposition: attachment; filename=\"{filename}\"\r\n"
    pieces = [quote(c, safe=_ATTRIBUTE_SAFE, encoding="utf-8") for c in filename]
    whole = "".join(pieces)
    if len(whole) <= 50:
        return f"Content-Disposition: attachment;\r\n filename*=utf-8''{whole}\r\n"
    sections: list[str] = []
    current = "utf-8''"
    for piece in pieces:
        if len(current) + len(piece) > 60:
            sections.append(current)
            current = ""
        current += piece
    sections.append(current)
    return "Content-Disposition: attachment" + "".join(
        f";\r\n filename*{i}*={section}" for i, section in enumerate(sections)) + "\r\n"
