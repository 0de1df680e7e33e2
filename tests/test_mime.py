"""``dispatcher.compose.mime``: what the builder promises, on generated jobs.

The differential test builds 3,000 seeded random jobs (non-ASCII everywhere, emoji and
combining characters, long words and display names, empty and huge bodies, every
shape) and parses each back with ``email.policy.default``: the headers and decoded
parts must equal the job, every line must be CRLF-terminated and at most 998 octets,
the bytes 7-bit. A few hundred of the same jobs then go through ``dispatcher run`` to a
real aiosmtpd server (tests/smtpserver.py) and must all be accepted and arrive equal.
Set MIME_SEED to replay another seed; a failure prints the seed and the job.
"""

from __future__ import annotations

import asyncio
import base64
import email
import email.policy
import functools
import gc
import itertools
import json
import os
import random
import re
import sys
from collections import Counter
from email.header import decode_header, make_header
from email.message import EmailMessage
from email.policy import EmailPolicy
from pathlib import Path
from typing import Any, ClassVar

import pytest
from smtpserver import FaultyServer

from dispatcher.compose import mime
from dispatcher.compose.address import parse_mailbox
from dispatcher.compose.jobs import JobError, Line, build, parse_job
from dispatcher.compose.mime import MessageError, build_message
from pool import DeliveryError, SMTPPool

pytestmark = pytest.mark.timeout(60)

SEED = int(os.environ.get("MIME_SEED", "9"))
JOBS = 3000
E2E_JOBS = 300
ROOT = Path(__file__).resolve().parent.parent

# Pieces of text ---------------------------------------------------------------------

_LATIN = "éüßøñçÅÆœÿ"
_SCRIPTS = ["中文", "日本語", "한국어", "עברית", "عربي", "Ελληνικά", "русский", "ไทย"]
_EMOJI = ["😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🇫🇷", "❤️", "🧪"]
_COMBINING = ["e\u0301", "a\u0308\u0304", "\u0301x", "n\u0303\u0323"]
_ODD = ["\u00a0", "\u200b", "\ufeff", "\u2028", "\u0085", "\x00", "\x01", "\x0b", "\x0c", "\x1b", "\x7f"]
_LOOKALIKES = ["=?utf-8?q?hi?=", "=?", "?=", "=?iso-8859-1?b?SGk=?=", "_", "=20", "=?utf-8?b?", "a=?b"]
_PUNCT = list("!#$%&'*+-/=?^_`{|}~.,;:()[]<>@\"\\")
_ATEXT = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


class Generator(random.Random):
    def ascii_word(self, low: int = 1, high: int = 12) -> str:
        return "".join(self.choices(_ATEXT, k=self.randint(low, high)))

    def word(self, controls: bool = True) -> str:
        kind = self.random()
        if kind < 0.55:
            return self.ascii_word()
        if kind < 0.58:
            return self.ascii_word(70, 120) if self.random() < 0.8 else self.ascii_word(990, 1100)  # > a line
        if kind < 0.68:
            return self.ascii_word(0, 3) + self.choice(_LATIN) + self.ascii_word(0, 3)
        if kind < 0.74:
            return self.choice(_SCRIPTS) * self.randint(1, 3)
        if kind < 0.80:
            return "".join(self.choices(_EMOJI, k=self.randint(1, 4)))
        if kind < 0.84:
            return self.choice(_COMBINING)
        if kind < 0.89:
            return self.choice(_LOOKALIKES)
        if kind < 0.95:
            return "".join(self.choices(_PUNCT, k=self.randint(1, 3)))
        if kind < 0.96:
            return "".join(self.choices(_SCRIPTS + _EMOJI + _COMBINING, k=self.randint(20, 60)))
        return self.choice(_ODD) if controls else self.choice(_LATIN)

    def space(self) -> str:
        kind = self.random()
        if kind < 0.85:
            return " "
        if kind < 0.97:
            return self.choice(["  ", "\t", " \t ", "   "])
        return " " * self.randint(71, 150)

    def phrase(self, words: int, controls: bool = True) -> str:
        parts = [self.word(controls)]
        for _ in range(words - 1):
            parts += [self.space(), self.word(controls)]
        return "".join(parts)

    def header_value(self) -> str:
        kind = self.random()
        if kind < 0.05:
            return ""
        if kind < 0.10:
            return self.choice([" ", "  x", "x  ", "\tx\t", " " * 200])
        if kind < 0.13:
            return self.phrase(self.randint(20, 50))
        value = self.phrase(self.randint(1, 4))
        if self.random() < 0.1:
            value = self.space() + value
        if self.random() < 0.1:
            value += self.space()
        return value

    def address(self) -> str:
        local = ".".join(self.ascii_word(1, 10) for _ in range(self.randint(1, 3)))
        if self.random() < 0.2:
            local += self.choice(["+tag", "-x", "_y", "'o", "~z", "=a"])
        domain = ".".join(self.ascii_word(1, 12).lower() for _ in range(self.randint(1, 3))) + ".example"
        return f"{local}@{domain}"

    def display_name(self) -> str:
        kind = self.random()
        if kind < 0.35:
            return f"{self.ascii_word(2, 10)} {self.ascii_word(2, 12)}"
        if kind < 0.50:
            return self.choice(["Doe, John", 'The "Best" Shop', "O'Brien (Sales)", "a\\b", "Dr. Who", "x@y", "[team]"])
        if kind < 0.60:
            return "Zoë " + self.choice(_SCRIPTS) + " " + self.choice(_EMOJI)
        if kind < 0.65:
            return self.phrase(self.randint(15, 40), controls=False)  # long: must fold
        return self.phrase(self.randint(1, 6), controls=False)

    def mailbox(self, names: float = 0.4) -> str:
        """Mostly one of a pool of 300 (a header parsed again tells nothing new)."""
        if names == 0.4 and self.random() < 0.8:
            if not hasattr(self, "pool"):
                self.pool = [self.new_mailbox(names) for _ in range(300)]
            return self.choice(self.pool)
        return self.new_mailbox(names)

    def new_mailbox(self, names: float) -> str:
        address = self.address()
        if self.random() >= names:
            return address
        name = self.display_name()
        quoted = '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
        value = f"{quoted} <{address}>"
        try:
            return value if parse_mailbox(value).address == address else address
        except ValueError:  # a name the strict parser refuses (a tab, an address in it)
            return address

    def body(self, line_break: str | None = None) -> str:
        kind = self.random()
        if kind < 0.05:
            return ""
        if kind < 0.055:
            chunk = self.phrase(self.randint(5, 40)) + self.choice(["\n", "\r\n", " "])
            return chunk * (100_000 // len(chunk) + 1)  # 100 KB and more
        ascii_only = self.random() < 0.5
        lines = []
        for _ in range(self.randint(1, 6)):
            start = self.random()
            if start < 0.7:
                line = (self.ascii_word() + " ") * self.randint(0, 12) if ascii_only else self.phrase(self.randint(1, 8))
            elif start < 0.8:
                line = self.choice([".", "..", ". leading dot", "From me", "From ", ">From x"])
            elif start < 0.88:
                line = self.ascii_word() + self.choice([" ", "  ", "\t", " \t"])  # trailing white space
            elif start < 0.94:
                line = "y" * self.choice([997, 998, 999, 1000, 2500])
            else:
                line = self.choice(["\x00", "\x0c", "tab\there", "=3D", "=", "=\r", "x=", "--=_"])
            lines.append(line)
        breaks = ["\n", "\r\n", "\r"]
        text = "".join(line + (line_break or self.choice(breaks)) for line in lines)
        return text if self.random() < 0.7 else text.rstrip("\r\n")

    def filename(self) -> str:
        kind = self.random()
        if kind < 0.4:
            return f"{self.ascii_word()}.{self.choice(['pdf', 'txt', 'png', 'csv'])}"
        if kind < 0.5:
            return self.choice(['a "quoted" name.txt', "back\\slash.txt", "two  spaces.txt", " lead.txt",
                                "trail.txt ", "=?utf-8?q?x?=.txt", "semi;colon.txt", "%41.txt", "star*.txt"])
        if kind < 0.7:
            return "résumé " + self.choice(_SCRIPTS) + self.choice(_EMOJI) + ".pdf"
        if kind < 0.85:
            return self.phrase(self.randint(5, 25), controls=False) + ".bin"
        return self.ascii_word(60, 300) + ".txt"

    def attachment(self) -> tuple[str, str, bytes]:
        size = self.choice([0, 1, 2, 3, 57, 58, 100, 1000]) if self.random() < 0.995 else 150_000
        content_type = self.choice(["application/pdf", "image/png", "text/plain", "application/octet-stream",
                                    "text/csv; charset=utf-8", "Application/VND.ms-Excel"])
        return self.filename(), content_type, self.randbytes(size)

    def header_name(self) -> str:
        return self.choice(["X-Campaign", "X-Mailer", "List-Id", "Comments", "Keywords", "X-" + self.ascii_word(1, 40)])

    def job(self, n: int) -> dict[str, Any]:
        shape = n % 8  # every shape, with and without attachments, in equal numbers
        body = shape % 4
        job: dict[str, Any] = {
            "from": self.mailbox(),
            "to": [self.mailbox() for _ in range(self.choice([1, 1, 1, 1, 2, 3]))] if n % 50 else
                  [self.mailbox(names=0.1) for _ in range(30)],  # folded after commas
            "cc": [self.mailbox() for _ in range(self.choice([0, 0, 0, 0, 1, 2]))],
            "reply_to": self.mailbox() if self.random() < 0.15 else None,
            "subject": self.header_value(),
            "text": self.body() if body in (0, 2) else None,
            "html": self.body() if body in (1, 2) else None,
            "headers": {},
            "attachments": [self.attachment() for _ in range(self.choice([1, 1, 1, 2, 3]))] if shape >= 4 else [],
        }
        for _ in range(self.choice([0, 0, 0, 1, 2])):
            name = self.header_name()
            # List-* are structured: printable ASCII as sent, never encoded (RFC 2369)
            job["headers"][name] = f"<{self.ascii_word(1, 30)}.example.org>" if name == "List-Id" \
                else self.header_value()
        if self.random() < 0.1:
            job["headers"]["List-Unsubscribe"] = (f"<https://example.org/u/{self.ascii_word(10, 120)}>, "
                                                  f"<mailto:unsubscribe@example.org?subject={self.ascii_word()}>")
        return job


def generated(count: int, seed: int = SEED) -> list[dict[str, Any]]:
    rng = Generator(seed)
    return [rng.job(n) for n in range(count)]


# The check ---------------------------------------------------------------------------

class _Default(EmailPolicy):
    """``email.policy.default``, but each distinct header value is parsed once: the
    parser asks for a part's Content-Type a dozen times, and a header object is
    immutable, so handing back the same one changes nothing but the time (a third)."""

    parsed: ClassVar[dict[tuple[str, str], Any]] = {}

    def header_fetch_parse(self, name: str, value: str) -> Any:
        if hasattr(value, "name"):
            return value
        header = self.parsed.get((name, value))
        if header is None:
            header = self.parsed[name, value] = super().header_fetch_parse(name, value)
        return header


DEFAULT = _Default()

def _display(name: str) -> str:
    """A display name as a reader sees it: a run of white space is one space."""
    return re.sub(r"[ \t]+", " ", name).strip(" ")


@functools.lru_cache(maxsize=4096)
def _expected_mailbox(value: str) -> tuple[str, str]:
    mailbox = parse_mailbox(value)
    return _display(mailbox.name), mailbox.address


def _mailboxes(values: list[str]) -> list[tuple[str, str]]:
    return [_expected_mailbox(value) for value in values]


_SPLIT_WORD = re.compile(r"(=\?utf-8\?[qb]\?[^?]*\?=)(?=\r?\n?[ \t]+=\?)")


def _parsed_mailboxes(message: EmailMessage, name: str, expected: list[tuple[str, str]]) -> None:
    """The header's mailboxes are ``expected``. CPython's address parser reads the white
    space between two encoded words of a display name as a space (RFC 2047 section 6.2:
    it is not text); where the builder had to split a word longer than one encoded word,
    the name is compared without white space, and the split is checked to be one."""
    header = message[name]
    assert not header.defects, (name, str(header), header.defects)
    parsed = [(_display(a.display_name), a.addr_spec) for a in header.addresses]
    if parsed == expected:
        return
    (raw,) = [value for key, value in message.raw_items() if key.lower() == name.lower()]
    split = [ew for ew in _SPLIT_WORD.findall(raw)
             if not str(make_header(decode_header(ew))).endswith((" ", "\t"))]
    assert split, (name, parsed, expected, raw)
    squeeze = [("".join(n.split()), a) for n, a in parsed], [("".join(n.split()), a) for n, a in expected]
    assert squeeze[0] == squeeze[1], (name, parsed, expected)


def _lines(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


def check(raw: bytes, job: dict[str, Any], *, wire: bool = False) -> None:
    """``raw`` is valid SMTP and says what ``job`` says. ``wire``: ``raw`` came through
    SMTP, where a message that did not end in a line break got one."""
    assert raw.isascii() and b"\x00" not in raw, "not 7-bit"
    assert raw.count(b"\r") == raw.count(b"\n") == raw.count(b"\r\n"), "a bare CR or LF"
    longest = max(len(line) for line in raw.split(b"\r\n"))
    assert longest <= 998, f"a line of {longest} octets"
    message = email.message_from_bytes(raw, policy=DEFAULT)
    assert isinstance(message, EmailMessage)
    assert not message.defects, message.defects

    _parsed_mailboxes(message, "From", _mailboxes([job["from"]]))
    _parsed_mailboxes(message, "To", _mailboxes(job["to"]))
    if job["cc"]:
        _parsed_mailboxes(message, "Cc", _mailboxes(job["cc"]))
    else:
        assert "Cc" not in message
    if job["reply_to"]:
        _parsed_mailboxes(message, "Reply-To", _mailboxes([job["reply_to"]]))
    subject = message["Subject"]
    assert str(subject) == job["subject"] and not subject.defects
    for name, value in job["headers"].items():
        header = message[name]
        assert str(header) == value and not header.defects, name
    names = [name.lower() for name in message.keys()]
    assert names.count("message-id") == 1 and names.count("date") == 1 and "bcc" not in names
    assert message["Date"].datetime is not None

    parts: list[Any] = [message]
    if job["attachments"]:
        assert message["Content-Type"].content_type == "multipart/mixed"
        parts = list(message.iter_parts())
        attachments, parts = parts[1:], parts[:1]
        assert len(attachments) == len(job["attachments"])
        for part, (filename, content_type, content) in zip(attachments, job["attachments"], strict=True):
            assert not part.defects, part.defects
            disposition = part["Content-Disposition"]
            assert disposition.content_disposition == "attachment" and not disposition.defects
            assert disposition.params["filename"] == filename
            assert part["Content-Type"].content_type == content_type.split(";")[0].lower()
            assert part.get_payload(decode=True) == content
    if job["text"] is not None and job["html"] is not None:
        (body,) = parts
        assert body["Content-Type"].content_type == "multipart/alternative"
        parts = list(body.iter_parts())
        expected = [("text/plain", job["text"]), ("text/html", job["html"])]
    elif job["html"] is not None:
        expected = [("text/html", job["html"])]
    else:
        expected = [("text/plain", job["text"] or "")]
    assert len(parts) == len(expected)
    for part, (content_type, text) in zip(parts, expected, strict=True):
        header = part["Content-Type"]
        assert header.content_type == content_type and not header.defects
        assert not part.defects, part.defects
        payload = part.get_payload(decode=True)
        assert isinstance(payload, bytes)
        content = payload.decode(header.params["charset"])  # what get_content() does
        decoded, want = _lines(content), _lines(text)
        if wire and part is message and decoded == want + "\n":
            continue  # SMTP ended the message with a line break
        assert decoded == want


def _describe(job: dict[str, Any]) -> str:
    return json.dumps({**job, "attachments": [(f, t, len(c)) for f, t, c in job["attachments"]]}, ensure_ascii=True)[:3000]


def _build(job: dict[str, Any]) -> bytes:
    return build_message(from_=job["from"], to=job["to"], cc=job["cc"], reply_to=job["reply_to"],
                         subject=job["subject"], text=job["text"], html=job["html"], headers=job["headers"],
                         attachments=job["attachments"])


# Tests -------------------------------------------------------------------------------

def test_generated_jobs_parse_back_equal_in_valid_7bit_smtp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mime, "_boundaries", mime._boundaries)  # restored afterwards
    jobs = generated(JOBS)
    shapes: Counter[str] = Counter()
    encodings: Counter[str] = Counter()
    gc.disable()  # the parser makes millions of objects: the collector's passes took 40% of the time
    try:
        for n, job in enumerate(jobs):
            # The same boundaries in every message: the parser compiles a regex per boundary
            # (~0.3 ms) and its cache then holds them. Uniqueness within a message is kept.
            mime._boundaries = itertools.count(1)
            raw = _build(job)
            try:
                check(raw, job)
            except AssertionError as exc:
                raise AssertionError(f"seed {SEED}, job {n}: {exc}\njob: {_describe(job)}\n"
                                     f"message: {raw[:4000]!r}") from None
            shapes[("text" if job["text"] is not None else "") + ("+html" if job["html"] is not None else "")
                   + (" +attachments" if job["attachments"] else "")] += 1
            for cte in re.findall(rb"(?m)^Content-Transfer-Encoding: (\S+)", raw):
                encodings[cte.decode()] += 1
            head = raw.partition(b"\r\n\r\n")[0]
            encodings["encoded words"] += b"=?utf-8?" in head
            encodings["RFC 2231 sections"] += b"filename*1*=" in raw
            encodings["folded headers"] += b"\r\n " in head
            encodings["lines over 78"] += any(len(line) > 78 for line in head.split(b"\r\n"))
            if n % 500 == 499:
                _Default.parsed.clear()
    finally:
        _Default.parsed.clear()
        gc.enable()
    print(f"{JOBS} jobs, seed {SEED}: {dict(shapes)}; {dict(encodings)}")
    assert len(shapes) == 8 and min(shapes.values()) >= JOBS // 8 - 1
    for wanted in ("7bit", "quoted-printable", "base64", "encoded words", "RFC 2231 sections", "folded headers"):
        assert encodings[wanted] >= 50, wanted


def test_non_ascii_subject_decodes_without_a_leading_space() -> None:
    raw = build_message(from_="a@example.org", to=["b@example.net"], subject="Grüße " * 40, text="x")
    (subject,) = re.findall(rb"(?m)^Subject:.*$", raw)
    assert subject.startswith(b"Subject: =?utf-8?")
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert str(parsed["Subject"]) == "Grüße " * 40


def test_unbroken_words_fold_within_998_octets() -> None:
    long_word = "x" * 5000
    job: dict[str, Any] = {
        "from": f'"{"N" * 2000}" <a@example.org>', "to": ["b@example.net"], "cc": [], "reply_to": None,
        "subject": long_word, "text": "y" * 5000, "html": None, "headers": {"X-Long": "é" * 3000},
        "attachments": [("f" * 1000 + ".txt", "text/plain", b"z" * 5000)]}
    raw = _build(job)
    check(raw, job)
    head = raw.partition(b"\r\n\r\n")[0]
    assert max(len(line) for line in head.split(b"\r\n")) <= 78


def test_plain_ascii_is_7bit_and_anything_else_quoted_printable() -> None:
    def encoding(text: str) -> bytes:
        raw = build_message(from_="a@example.org", to=["b@example.net"], subject="s", text=text)
        (cte,) = re.findall(rb"(?m)^Content-Transfer-Encoding: (\S+)", raw)
        return bytes(cte)

    assert encoding("a" * 998 + "\n" + "b" * 998) == b"7bit"
    assert encoding("tab\tand trailing space \n.\nFrom x\n") == b"7bit"
    assert encoding("a" * 999) == b"quoted-printable"
    assert encoding("nul\x00") == b"quoted-printable"
    assert encoding("café") == b"quoted-printable"


def test_a_boundary_never_occurs_inside_a_part(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mime, "_boundaries", itertools.count(7))
    text = f"--=_{mime._unique}.7_\n--=_{mime._unique}.7_--\n"
    job: dict[str, Any] = {"from": "a@example.org", "to": ["b@example.net"], "cc": [], "reply_to": None,
                           "subject": "s", "text": text, "html": text, "headers": {}, "attachments": []}
    raw = _build(job)
    assert f'boundary="=_{mime._unique}.7_"'.encode() not in raw
    check(raw, job)


def test_given_message_id_and_date_are_kept_and_not_repeated() -> None:
    date = "Tue, 25 Nov 2025 00:00:00 +0000"
    unsubscribe = "<https://example.org/u/" + "t" * 120 + ">, <mailto:u@example.org?subject=unsubscribe>"
    raw = build_message(from_="News <news@example.org>", to=["b@example.net"], subject="s", text="x", html="<p>x</p>",
                        headers={"List-Unsubscribe": unsubscribe, "List-Unsubscribe-Post": "List-Unsubscribe=One-Click"},
                        message_id="<given@example.org>", date=date)
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed.get_all("Message-ID") == ["<given@example.org>"] and parsed.get_all("Date") == [date]
    assert str(parsed["List-Unsubscribe"]) == unsubscribe
    in_headers = build_message(from_="a@example.org", to=["b@example.net"], subject="s",
                               headers={"message-id": "<h@example.org>", "DATE": date})
    parsed = email.message_from_bytes(in_headers, policy=email.policy.default)
    assert parsed.get_all("Message-ID") == ["<h@example.org>"] and parsed.get_all("Date") == [date]


def test_message_ids_are_unique_also_in_a_forked_child() -> None:
    ids = {mime.new_message_id("example.org") for _ in range(1000)}
    assert len(ids) == 1000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report one id and leave at once
        os.write(write, mime.new_message_id("example.org").encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 200).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child.split(".")[0] != next(iter(ids)).split(".")[0]
    assert mime.new_message_id("bücher.example").endswith("@xn--bcher-kva.example>")
    assert mime.new_message_id("[127.0.0.1]").endswith("@localhost>")


def test_a_non_ascii_address_is_written_as_utf8_never_encoded() -> None:
    raw = build_message(from_="Zoë <zoë@bücher.example>", to=["δοκιμή@παράδειγμα.example"], subject="s", text="x")
    assert "From: Zoë".encode() not in raw and "<zoë@bücher.example>".encode() in raw
    parsed = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)  # RFC 6532
    assert [(a.display_name, a.addr_spec) for a in parsed["From"].addresses] == [("Zoë", "zoë@bücher.example")]
    assert parsed["To"].addresses[0].addr_spec == "δοκιμή@παράδειγμα.example"


def test_values_no_line_can_hold_are_job_errors_naming_the_field() -> None:
    def job(**fields: Any) -> bytes:
        document = {"id": "j", "from": "a@example.org", "to": ["b@example.net"], "subject": "s", **fields}
        return json.dumps(document).encode()

    for line, field in [(job(subject="\ud800"), "subject"), (job(text="a\udfffb"), "text"),
                        (job(html="\ud800"), "html"), (job(headers={"X-A": "\ud800"}), "headers.X-A"),
                        (job(headers={"X-" + "n" * 200: "v"}), "headers"),
                        (job(attachments=[{"filename": "\ud800", "content_base64": ""}]), "attachments.0.filename"),
                        (job(attachments=[{"filename": "a", "content_type": "nonsense", "content_base64": ""}]),
                         "attachments.0.content_type")]:
        with pytest.raises(JobError) as caught:
            build(parse_job(Line(1, line, len(line))))
        assert caught.value.field == field
    with pytest.raises(MessageError):
        build_message(from_="a@example.org", to=["x" * 1000 + "@example.net"], subject="s")


# End to end ----------------------------------------------------------------------------

async def test_generated_jobs_are_accepted_end_to_end_and_arrive_equal(server: FaultyServer, tmp_path: Path) -> None:
    import base64

    jobs, lines = {}, []
    for n, job in enumerate(generated(E2E_JOBS, SEED + 1)):
        job["headers"]["X-Test-Id"] = f"e2e-{n}"
        document = {"id": f"e2e-{n}", **{k: v for k, v in job.items() if k != "attachments" and v is not None},
                    "attachments": [{"filename": f, "content_type": t, "content_base64": base64.b64encode(c).decode()}
                                    for f, t, c in job["attachments"]]}
        line = json.dumps(document).encode()
        try:
            parse_job(Line(n + 1, line, len(line)))
        except JobError:
            continue  # the validator's own limits (e.g. a word of 900+ characters): not this test's subject
        jobs[f"e2e-{n}"] = job
        lines.append(line)
    assert len(jobs) >= E2E_JOBS * 2 // 3
    (tmp_path / "jobs.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "config.yaml").write_text(
        f"smtp:\n  hostname: 127.0.0.1\n  port: {server.port}\n  timeout: 10\npool:\n  size: 4\n")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dispatcher.cli", "run", "jobs.jsonl", "--config", "config.yaml", "--no-progress",
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(45):
        _, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    results = [json.loads(x) for x in (tmp_path / "jobs.results.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in results) == sorted(jobs) and {r["status"] for r in results} == {"sent"}
    assert len(server.messages) == len(jobs)
    for received in server.messages:
        job_id = received.header("X-Test-Id")
        assert job_id is not None
        try:
            check(received.content, jobs[job_id], wire=True)
        except AssertionError as exc:
            raise AssertionError(f"seed {SEED + 1}, {job_id}: {exc}\njob: {_describe(jobs[job_id])}") from None


def test_prepared_messages_go_on_the_wire_exactly_as_fully_checked_ones() -> None:
    """``SMTPPool.submit(prepared=True)`` skips the bare-CR/LF scan for what this builder
    makes: on every generated job the wire bytes are the same as with the full check."""
    from pool.envelope import build_envelope

    for n, job in enumerate(generated(600)):
        raw = _build(job)
        ended = raw if raw.endswith(b"\r\n") else raw + b"\r\n"  # as jobs.build hands it over
        fast = build_envelope(ended, "a@example.org", ["b@example.net"], prepared=True)
        full = build_envelope(raw, "a@example.org", ["b@example.net"])
        assert fast.content == full.content, f"seed {SEED}, job {n}"
        assert fast.message_id == full.message_id


def test_built_jobs_are_prepared_and_end_with_a_line_break() -> None:
    line = json.dumps({"id": "p1", "from": "a@example.org", "to": ["b@example.net"], "subject": "s",
                       "text": "no line break at the end"}).encode()
    outgoing = build(parse_job(Line(1, line, len(line))))
    assert outgoing.prepared and outgoing.message.endswith(b"end\r\n")
    raw = json.dumps({"id": "p2", "mail_from": "a@example.org", "rcpt_to": ["b@example.net"],
                      "raw": "Subject: x\n\nbare\nline feeds"}).encode()
    assert not build(parse_job(Line(2, raw, len(raw)))).prepared  # the caller's bytes: checked in full


# -- nothing 8-bit undeclared (docs/library.md promise 14), on the wire --------------------

def _composed(**fields: Any) -> bytes:
    document = {"id": "8", "from": "a@example.org", "to": ["b@example.net"], "subject": "s", "text": "t", **fields}
    raw = json.dumps(document).encode()
    return build(parse_job(Line(1, raw, len(raw)))).message


_UTF8_REPLY_TO = {"reply_to": "Zoë <zoë@example.net>"}  # a non-ASCII local part: UTF-8 in the header
_RAW_UTF8_BODY = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: s\r\nContent-Type: text/plain; " \
                 b"charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n\r\nGr\xc3\xbc\xc3\x9fe\r\n"


@pytest.mark.parametrize("pipelining", [True, False])
@pytest.mark.parametrize(("smtputf8", "eightbitmime", "message", "expected"), [
    (True, True, "utf8 header", ["SMTPUTF8", "BODY=8BITMIME"]),
    (True, False, "utf8 header", ["SMTPUTF8"]),
    (False, True, "utf8 header", "5.6.7"),
    (False, False, "utf8 header", "5.6.7"),
    (False, True, "8-bit body", ["BODY=8BITMIME"]),
    (True, True, "8-bit body", ["BODY=8BITMIME"]),
    (False, False, "8-bit body", "5.6.3"),
    (False, False, "7-bit", []),
    (True, True, "non-ASCII display name", []),  # RFC 2047: 7-bit
])
async def test_nothing_8bit_goes_out_undeclared(pipelining: bool, smtputf8: bool, eightbitmime: bool, message: str,
                                               expected: list[str] | str) -> None:
    content = {"utf8 header": lambda: _composed(**_UTF8_REPLY_TO), "8-bit body": lambda: _RAW_UTF8_BODY,
               "7-bit": lambda: _composed(), "non-ASCII display name": lambda: _composed(to=["Zoë <z@example.net>"],
                                                                                           subject="Grüße")}[message]()
    server = FaultyServer(pipelining=pipelining, smtputf8=smtputf8, eightbitmime=eightbitmime)
    async with server, SMTPPool(hostname="127.0.0.1", port=server.port, size=1, max_attempts=1) as pool:
        if isinstance(expected, str):
            with pytest.raises(DeliveryError) as caught:
                await pool.submit(content, sender="a@example.org", recipients=["b@example.net"])
            assert caught.value.permanent and expected in str(caught.value.response)
            assert server.messages == []
        else:
            await pool.submit(content, sender="a@example.org", recipients=["b@example.net"])
            assert [m.mail_options for m in server.messages] == [expected]
            if not expected:
                assert server.messages[0].content.isascii()


# -- structured headers, custom headers, unsubscribe URLs (docs/campaigns.md) -----------------

def _job_error(**fields: Any) -> JobError:
    document = {"id": "h", "from": "a@example.org", "to": ["b@example.net"], "subject": "s", "text": "t", **fields}
    raw = json.dumps(document).encode()
    with pytest.raises(JobError) as caught:
        build(parse_job(Line(1, raw, len(raw))))
    return caught.value


@pytest.mark.parametrize(("headers", "field"), [
    ({"Return-Path": "<evil@evil.example>"}, "headers.Return-Path"),
    ({"Received": "from evil"}, "headers.Received"),
    ({"DKIM-Signature": "v=1; d=evil.example"}, "headers.DKIM-Signature"),
    ({"Message-ID": "<a@example.org>", "message-id": "<b@example.org>"}, "headers.message-id"),
    ({"Date": "yesterday"}, "headers.Date"),
    ({"Date": "Mon, 1 Jan 2024 09:00:00 +0000", "DATE": "Tue, 2 Jan 2024 09:00:00 +0000"}, "headers.DATE"),
    ({"Message-ID": "not-an-id"}, "headers.Message-ID"),
    ({"In-Reply-To": "<ä@example.org>"}, "headers.In-Reply-To"),
    ({"List-Unsubscribe": "https://example.org/u/1"}, "headers.List-Unsubscribe"),
    ({"List-Unsubscribe": "<javascript:alert(1)>"}, "headers.List-Unsubscribe"),
])
def test_custom_headers_cannot_forge_structure(headers: dict[str, str], field: str) -> None:
    assert _job_error(headers=headers).field == field


@pytest.mark.parametrize(("name", "value"), [
    ("In-Reply-To", "<" + "x" * 850 + "@example.org>"),  # a long word
    ("References", "<a=?utf-8?q?x?=@example.org> <b@example.org>"),  # '=?' in an id
    ("List-Unsubscribe", "<https://example.org/u/=?utf-8?b?eA==?=>, <mailto:u@example.org>"),
    ("List-Id", "News =?utf-8?q?x?= <news.example.org>"),
])
def test_structured_headers_are_written_as_given_never_encoded(name: str, value: str) -> None:
    document = {"id": "s", "from": "a@example.org", "to": ["b@example.net"], "subject": "s", "text": "t",
                "headers": {name: value}}
    raw = json.dumps(document).encode()
    message = build(parse_job(Line(1, raw, len(raw)))).message
    head = message.split(b"\r\n\r\n", 1)[0].decode("ascii")
    unfolded = re.sub(r"\r\n[ \t]+", " ", head)
    assert f"{name}: {value}\r\n" in unfolded + "\r\n"
    assert "=?utf-8?" not in unfolded.replace(value, "")
    assert max(len(line) for line in head.split("\r\n")) <= 998


def test_unsubscribe_url_values_are_percent_encoded() -> None:
    from dispatcher.compose.templates import Unsubscribe

    unsubscribe = Unsubscribe(url="https://example.org/u/{{ id }}?r={{ to[0] }}", mailto="u@example.org")
    headers = unsubscribe.headers({"id": "id 2 ü/..#frag", "to": ["b+tag&admin=1@example.net"]})
    assert headers["List-Unsubscribe"] == ("<https://example.org/u/id%202%20%C3%BC%2F..%23frag"
                                           "?r=b%2Btag%26admin%3D1%40example.net>, <mailto:u@example.org>")
    assert headers["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"
    weird = Unsubscribe(url="https://example.org/u/{{ id }}").headers({"id": "=?utf-8?b?eA==?="})
    document = {"id": "u", "from": "a@example.org", "to": ["b@example.net"], "subject": "s", "text": "t",
                "headers": weird}
    raw = json.dumps(document).encode()
    head = build(parse_job(Line(1, raw, len(raw)))).message.split(b"\r\n\r\n", 1)[0]
    assert b"List-Unsubscribe: <https://example.org/u/%3D%3Futf-8%3Fb%3FeA%3D%3D%3F%3D>\r\n" in head + b"\r\n"


# -- message/* and multipart/* attachments are never base64 (RFC 2046 section 5.2.1) ---------

_EML = "From: a@example.org\nTo: b@example.net\nSubject: Forwarded Grüße\nMIME-Version: 1.0\n" \
       "Content-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nHallo Zoë\n.\n"
_MULTIPART = ('--inner\r\nContent-Type: text/plain\r\n'
              '\r\nplain\r\n--inner\r\nContent-Type: text/html\r\n\r\n<p>html</p>\r\n--inner--\r\n')


@pytest.mark.parametrize(("filename", "content_type", "content", "encoding"), [
    ("fwd.eml", None, _EML.encode(), "8bit"),  # type from the name: message/rfc822
    ("page.mht", None, _EML.replace("Grüße", "Gruesse").replace("Zoë", "Zoe").encode("ascii"), "7bit"),
    ("alt.txt", 'multipart/alternative; boundary="inner"', _MULTIPART.encode(), "7bit"),
])
def test_message_and_multipart_attachments_are_sent_as_they_are(filename: str, content_type: str | None,
                                                                 content: bytes, encoding: str) -> None:
    attachment: dict[str, Any] = {"filename": filename, "content_base64": base64.b64encode(content).decode()}
    if content_type:
        attachment["content_type"] = content_type
    document = {"id": "a", "from": "a@example.org", "to": ["b@example.net"], "subject": "s", "text": "t",
                "attachments": [attachment]}
    raw = json.dumps(document).encode()
    message = build(parse_job(Line(1, raw, len(raw)))).message
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    part = next(iter(parsed.iter_attachments()))
    assert part["Content-Transfer-Encoding"] == encoding
    assert not part.defects
    if part.get_content_type() == "message/rfc822":
        inner = part.get_content()
        assert inner["Subject"] in ("Forwarded Grüße", "Forwarded Gruesse")
        assert "Hall" in inner.get_content()
    else:
        assert [p.get_content_type() for p in part.iter_parts()] == ["text/plain", "text/html"]


def test_a_message_attachment_that_cannot_be_sent_as_it_is_is_invalid() -> None:
    for content in (b"Subject: x\n\n" + b"y" * 1200 + b"\n", b"Subject: x\n\n\x00\n"):
        error = _job_error(attachments=[{"filename": "m.eml", "content_base64": base64.b64encode(content).decode()}])
        assert error.field == "attachments.0"


@pytest.mark.parametrize("value", ["<https://example.org/u/1>", "<mailto:u@example.org>, <https://example.org/u/x>",
                                   "a" * 60, "a" * 61, "a" * 62, "<a@b> " + "x" * 55, "<a@b>  two  spaces",
                                   "<a@b>\ttab", "w " * 40 + "end"])
def test_a_structured_header_on_one_line_is_what_folding_writes(value: str) -> None:
    """The one-line shortcut writes exactly what the folder writes for the same words."""
    from dispatcher.compose.mime import _Folder, _structured_header

    for name in ("List-Unsubscribe", "In-Reply-To", "X"):
        out: list[str] = []
        _structured_header(out, name, value, "headers")
        folder = _Folder(name)
        for word in value.split():
            folder.add(" ", word)
        expected: list[str] = []
        folder.end(expected)
        assert out == expected
