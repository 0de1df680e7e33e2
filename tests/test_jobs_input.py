"""Generated input for the job reader and the runner: random and malformed JSON lines,
random bytes, huge lines, byte order marks, NULs, deep nesting. Every line must end as
exactly one result line (or be skipped as blank), and nothing may raise."""

from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path
from typing import Any

import pytest
from smtpserver import FaultyServer
from test_dispatcher import dispatcher, write_config

from dispatcher.compose.jobs import (
    MAX_LINE_BYTES,
    JobError,
    Line,
    build,
    parse_job,
    read_lines,
)

pytestmark = pytest.mark.timeout(120)

_VALUES: list[Any] = [None, True, 0, -1, 1.5, "", "x", "a@example.org", "not an address", [], {}, ["a@example.net"],
                      {"k": "v"}, "\u00e9\u4e2d", "\ud800", "line\r\nBcc: x@example.net", "\x00", "a" * 2000,
                      10 ** 30, float("inf")]
_FIELDS = ["id", "from", "to", "cc", "bcc", "reply_to", "subject", "text", "html", "headers", "attachments",
           "mail_from", "rcpt_to", "raw", "template", "data", "extra"]


def _valid(rng: random.Random, n: int) -> dict[str, Any]:
    if rng.random() < 0.3:
        return {"id": f"raw-{n}", "mail_from": "a@example.org", "rcpt_to": [f"r{n}@example.net"],
                "raw": f"Subject: raw {n}\r\n\r\nbody {rng.random()}\r\n"}
    record: dict[str, Any] = {"id": f"job-{n}", "from": "Zoë <a@example.org>", "to": [f"r{n}@example.net"],
                              "subject": rng.choice(["hi", "Grüße", "x " * 100]), "text": "body\n.\n..\n"}
    if rng.random() < 0.3:
        record["attachments"] = [{"filename": "a.bin",
                                  "content_base64": base64.b64encode(rng.randbytes(rng.randrange(64))).decode()}]
    return record


def _mangled(rng: random.Random, n: int) -> dict[str, Any]:
    record = _valid(rng, n)
    for _ in range(rng.randrange(1, 4)):
        key = rng.choice(_FIELDS)
        if rng.random() < 0.3:
            record.pop(key, None)
        else:
            record[key] = rng.choice(_VALUES)
    return record


def random_line(rng: random.Random, n: int) -> bytes:
    """One line of a jobs file, without its newline."""
    kind = rng.randrange(12)
    if kind <= 2:
        return json.dumps(_valid(rng, n)).encode()
    if kind <= 5:
        return json.dumps(_mangled(rng, n), ensure_ascii=rng.random() < 0.5).encode("utf-8", "surrogatepass")
    if kind == 6:
        return rng.randbytes(rng.randrange(1, 300)).replace(b"\n", b"")
    if kind == 7:
        text = json.dumps(_valid(rng, n)).encode()
        cut = rng.randrange(len(text))
        return text[:cut] + rng.choice([b"", b"\x00", b"\xff", b"\xef\xbb\xbf", b"}", b'"']) + text[cut + 1:]
    if kind == 8:
        depth = rng.choice([10, 1000, 5000, 100_000])
        return b'{"id": "deep-%d", "data": ' % n + b"[" * depth + b"]" * depth + b"}"
    if kind == 9:
        return rng.choice([b"[]", b"null", b"42", b'"string"', b"{}", b"{" + b"1" * 5000 + b"}", b"1" * 5000,
                           b'{"id": ' + b"9" * 5000 + b"}", b"\xef\xbb\xbf{}", b"\x00" * 10])
    if kind == 10:
        return json.dumps({**_valid(rng, n), "id": f"job-{rng.randrange(n + 1)}"}).encode()  # duplicates
    return rng.choice([b"", b"   ", b"\t", b"\r"])  # blank


def test_parse_and_build_raise_nothing_but_job_error() -> None:
    rng = random.Random(13)
    outcomes = {"built": 0, "invalid": 0}
    for n in range(3000):
        raw = random_line(rng, n)
        try:
            outcomes["built"] += bool(build(parse_job(Line(n + 1, raw, len(raw)))))
        except JobError as exc:
            assert str(exc)
            assert exc.job_id is None or (isinstance(exc.job_id, str) and 0 < len(exc.job_id) <= 1000)
            outcomes["invalid"] += 1
    assert outcomes["built"] > 300 and outcomes["invalid"] > 300


def test_line_splitter_is_chunking_independent() -> None:
    rng = random.Random(7)
    for _ in range(200):
        data = b"\n".join(rng.choice([b"", b" ", b"abc", b"\xef\xbb\xbfx", rng.randbytes(rng.randrange(40))])
                          for _ in range(rng.randrange(1, 20)))
        if rng.random() < 0.5:
            data = b"\xef\xbb\xbf" + data
        expected = _reference_lines(data, max_bytes=25)
        for chunk_size in (1, 2, 3, 7, 64, 1 << 20):
            got = [(line.number, line.content, line.size)
                   for line in read_lines(io.BytesIO(data), max_bytes=25, chunk_size=chunk_size)]
            assert got == expected, (data, chunk_size)


def _reference_lines(data: bytes, max_bytes: int) -> list[tuple[int, bytes | None, int]]:
    out: list[tuple[int, bytes | None, int]] = []
    pieces = data.split(b"\n")
    for number, piece in enumerate(pieces, 1):
        last = number == len(pieces)
        if last and not piece:
            break
        raw = piece if last else piece + b"\n"
        content: bytes | None = raw if len(piece) <= max_bytes else None
        if content is not None and number == 1 and content.startswith(b"\xef\xbb\xbf"):
            content = content[3:]
        if content is not None and not content.strip():
            continue
        out.append((number, content, len(raw)))
    return out


async def test_every_generated_line_ends_as_exactly_one_result(server: FaultyServer, tmp_path: Path) -> None:
    rng = random.Random(2026)
    lines = [b"\xef\xbb\xbf" + json.dumps(_valid(rng, 0)).encode()]  # a byte order mark first
    lines += [random_line(rng, n) for n in range(1, 400)]
    lines.insert(200, b'{"id": "huge", "text": "' + b"x" * (MAX_LINE_BYTES + 10) + b'"}')
    lines.insert(300, b"\x00" * 100)
    jobs = tmp_path / "jobs.jsonl"
    data = b"\n".join(lines) + rng.choice([b"", b"\n"])
    jobs.write_bytes(data)
    expected = {number for number, _, _ in _reference_lines(data, MAX_LINE_BYTES)}
    config = write_config(tmp_path / "c.yaml", server, size=4)
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path,
                                    timeout=90)
    assert code == 1, err
    assert "Traceback" not in err
    rows = [json.loads(line) for line in (tmp_path / "jobs.results.jsonl").read_bytes().splitlines()]
    numbers = [row["line"] for row in rows]
    assert len(numbers) == len(set(numbers)), "one result per line"
    assert set(numbers) == expected
    sent = [row for row in rows if row["status"] == "sent"]
    assert len(sent) == len(server.messages) > 50
    assert {row["status"] for row in rows} <= {"sent", "failed", "invalid"}  # failed: e.g. a non-ASCII sender
    # A re-run finds every line recorded: nothing is sent or written again.
    before = (tmp_path / "jobs.results.jsonl").read_bytes()
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path,
                                    timeout=90)
    assert code == (0 if {row["status"] for row in rows} == {"sent"} else 1), err  # not sent before: not now
    assert (tmp_path / "jobs.results.jsonl").read_bytes() == before
    assert len(server.messages) == len(sent)


# -- item: strict addresses (docs/run.md) ---------------------------------------------

_AMBIGUOUS_FIELDS = [
    ({"to": ["bob@example.com <alice@example.net>"]}, "to.0"),
    ({"to": ["ok@example.net", "alice@example.net, bob@example.net"]}, "to.1"),
    ({"cc": ["ok@example.net", '"bob@example.com" <alice@example.net>']}, "cc.1"),
    ({"bcc": ["a..b@example.net"]}, "bcc.0"),
    ({"from": "Ada <ada@example.org"}, "from"),
    ({"reply_to": "ada@example.org (Ada)"}, "reply_to"),
    ({"to": ["Lovelace, Ada <ada@example.net>"]}, "to.0"),
    ({"to": ['"quoted local"@example.net']}, "to.0"),
]


@pytest.mark.parametrize(("change", "field"), _AMBIGUOUS_FIELDS)
def test_ambiguous_address_makes_the_job_invalid_naming_the_field(change: dict[str, Any], field: str) -> None:
    document = {"id": "j", "from": "a@example.org", "to": ["b@example.net"], "subject": "s", "text": "t", **change}
    raw = json.dumps(document).encode()
    with pytest.raises(JobError) as caught:
        build(parse_job(Line(1, raw, len(raw))))
    assert caught.value.field == field, str(caught.value)


def test_raw_job_envelope_addresses_are_strict() -> None:
    for change, field in (({"rcpt_to": ["a@example.net", "b@example.net, c@example.net"]}, "rcpt_to.1"),
                          ({"mail_from": "Ada <a@example.org>"}, "mail_from")):
        document = {"id": "r", "mail_from": "a@example.org", "rcpt_to": ["b@example.net"],
                    "raw": "From: a@example.org\r\n\r\nx\r\n", **change}
        raw = json.dumps(document).encode()
        with pytest.raises(JobError) as caught:
            parse_job(Line(1, raw, len(raw)))
        assert caught.value.field == field


def test_display_name_and_idna_domain_reach_the_envelope_as_the_one_address() -> None:
    document = {"id": "j", "from": "Zoë <zoe@bücher.example>", "to": ["Ada Lovelace <ada@example.net>"],
                "cc": ['"Doe, John" <john@example.net>'], "subject": "s", "text": "t"}
    raw = json.dumps(document).encode()
    out = build(parse_job(Line(1, raw, len(raw))))
    assert out.sender == "zoe@xn--bcher-kva.example"
    assert out.recipients == ["ada@example.net", "john@example.net"]
    assert b"To: Ada Lovelace <ada@example.net>\r\n" in out.message


async def test_ambiguous_recipient_is_never_sent_and_the_batch_goes_on(server: FaultyServer, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"id": "wrong", "from": "a@example.org", "to": ["bob@example.com <alice@example.net>"],
              "subject": "s", "text": "t"},
             {"id": "two", "from": "a@example.org", "to": ["alice@example.net, bob@example.net"],
              "subject": "s", "text": "t"},
             {"id": "good", "from": "a@example.org", "to": ["carol@example.net"], "subject": "s", "text": "t"}]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = write_config(tmp_path / "c.yaml", server, size=1)
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
    assert code == 1, err
    rows = {row["id"]: row for row in map(json.loads, (tmp_path / "jobs.results.jsonl").read_text().splitlines())}
    assert rows["wrong"]["status"] == rows["two"]["status"] == "invalid"
    assert "to.0" in rows["wrong"]["error"] and "to.0" in rows["two"]["error"]
    assert rows["good"]["status"] == "sent"
    assert [m.rcpt_tos for m in server.messages] == [["carol@example.net"]]


# -- Message-ID from the job and its batch (docs/run.md) ---------------------------------

def test_message_id_is_derived_from_the_id_and_the_batch() -> None:
    raw = json.dumps({"id": "j1", "from": "Zoë <a@Bücher.example>", "to": ["b@example.net"], "subject": "s",
                      "text": "t"}).encode()
    job = parse_job(Line(1, raw, len(raw)))

    def message_id(batch: str | None) -> bytes:
        head = build(job, batch=batch).message.split(b"\r\n\r\n", 1)[0]
        return next(line for line in head.split(b"\r\n") if line.startswith(b"Message-ID:"))

    first = message_id("/data/a.results.jsonl")
    assert first == message_id("/data/a.results.jsonl")
    assert first.endswith(b"@xn--bcher-kva.example>")
    assert b"j1" not in first  # the id is not shown
    assert first != message_id("/data/b.results.jsonl")
    assert message_id(None) != message_id(None)  # no batch: random, as before


async def test_result_rows_carry_the_message_id_and_a_resend_reuses_it(server: FaultyServer, tmp_path: Path) -> None:
    jobs = tmp_path / "jobs.jsonl"
    lines = [{"id": "c1", "from": "a@example.org", "to": ["b@example.net"], "subject": "s", "text": "t"},
             {"id": "r1", "mail_from": "a@example.org", "rcpt_to": ["b@example.net"],
              "raw": "From: a@example.org\r\nMessage-ID: <raw-1@example.org>\r\n\r\nx\r\n"},
             {"id": "bad", "from": "a@example.org", "to": ["x, y"], "subject": "s", "text": "t"}]
    jobs.write_text("".join(json.dumps(line) + "\n" for line in lines))
    config = write_config(tmp_path / "c.yaml", server, size=1)
    results = tmp_path / "jobs.results.jsonl"
    for _ in range(2):  # the second run: as after a crash that lost the results file
        results.unlink(missing_ok=True)
        code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
        assert code == 1, err
    rows = {row["id"]: row for row in map(json.loads, results.read_text().splitlines())}
    assert rows["bad"]["message_id"] is None
    assert rows["r1"]["message_id"] == "<raw-1@example.org>"
    assert rows["c1"]["message_id"].endswith("@example.org>")
    sent = [m.message_id for m in server.messages]
    assert sent.count(rows["c1"]["message_id"]) == 2, sent  # both copies carry the same Message-ID


@pytest.mark.parametrize("value", [2 ** 63 - 1, 2 ** 64 - 1, 2 ** 64, -(2 ** 63) - 1, 10 ** 30, -(10 ** 40), 1e19,
                                   -9.5e18, 9.99, 12345678901234567890123, [[{"n": 2 ** 70}]]])
def test_numbers_are_read_as_the_standard_library_reads_them(value: Any) -> None:
    """orjson reads the line when it can, and an integer beyond 64 bits (a float to
    orjson) anywhere in the document sends it back to ``json``: every number comes out
    as ``json.loads`` reads it, of the same type."""
    from dispatcher.compose.jobs import parse_line

    document = {"id": "n", "template": "t", "to": ["a@example.net"],
                "data": {"v": value, "deep": [{"v": value}], "digits": "9" * 40}}
    line = json.dumps(document).encode()
    job = parse_line(Line(1, line, len(line)))
    expected = json.loads(line)["data"]
    assert job.data == expected  # type: ignore[union-attr]
    assert repr(job.data) == repr(expected)  # type: ignore[union-attr]  # 2**70, not 1.1805916207174113e+21
