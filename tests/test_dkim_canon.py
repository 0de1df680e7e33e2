"""``pool.dkim``'s own canonicalisation, header selection and body hash are dkimpy's,
byte for byte, on generated messages: folded fields, runs of tabs and spaces, white
space before line breaks, empty lines at the end, repeated and oversigned fields,
8-bit bytes, messages without a body. dkimpy stays the reference here; the signature
made over them is the one ``dkim.DKIM.sign`` writes, and dkimpy verifies it."""

from __future__ import annotations

import base64
import hashlib

import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from dkim.canonicalization import Relaxed, Simple  # type: ignore[import-untyped]
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pool.dkim import (
    OVERSIGNED_HEADERS,
    SIGNED_HEADERS,
    DKIMSigner,
    _plan,
    _relaxed_field,
    body_digest,
    parse_message,
    relaxed_body,
    relaxed_headers,
    select_headers,
    sign_all,
    simple_body,
    simple_headers,
)

pytestmark = pytest.mark.timeout(120)

NAMES = ["From", "To", "Cc", "Subject", "Date", "Message-ID", "Reply-To", "List-Unsubscribe",
         "List-Unsubscribe-Post", "Content-Type", "X-Mailer", "Received", "Feedback-ID", "Sender"]
WORD = st.text(alphabet="abcXYZ09<>@.,;:=\"'()!~" + "\u00e9", min_size=0, max_size=8).map(
    lambda text: text.encode("utf-8"))
SPACE = st.sampled_from([b" ", b"  ", b"\t", b" \t ", b"\t\t", b""])
FOLD = st.sampled_from([b"\r\n ", b"\r\n\t", b" \r\n  ", b"\r\n \t"])


@st.composite
def values(draw: st.DrawFn) -> bytes:
    """A field value: words, runs of white space, folds; spaces at either end."""
    parts = [draw(SPACE)]
    for _ in range(draw(st.integers(0, 6))):
        parts.append(draw(WORD))
        parts.append(draw(st.one_of(SPACE, FOLD)) if draw(st.booleans()) else draw(SPACE))
    return b"".join(parts)


@st.composite
def names(draw: st.DrawFn) -> bytes:
    name = draw(st.sampled_from(NAMES))
    case = draw(st.sampled_from([str.lower, str.upper, str.title, lambda s: s]))
    return str(case(name)).encode()


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """Lines of words and white space (trailing too, tabs, runs), empty lines, a last
    line with or without CRLF, empty lines at the end."""
    lines = [b"".join(draw(st.lists(st.one_of(WORD, SPACE), max_size=8)))
             for _ in range(draw(st.integers(0, 6)))]
    body = b"\r\n".join(lines)
    if draw(st.booleans()):
        body += b"\r\n" * draw(st.integers(1, 4))
    return body


@st.composite
def messages(draw: st.DrawFn, *, with_from: bool = True) -> bytes:
    fields = [(draw(names()), draw(values())) for _ in range(draw(st.integers(0, 10)))]
    if with_from:
        fields.insert(draw(st.integers(0, len(fields))), (b"From", b" a@example.org"))
    head = b"".join(name + draw(st.sampled_from([b":", b": ", b":\t"])) + value + b"\r\n" for name, value in fields)
    if draw(st.booleans()):
        head = b"From sender@example.org Fri Dec  4 18:00:00 2026\r\n" + head  # an mbox line
    if not draw(st.integers(0, 9)):
        return head  # no body, no empty line
    return head + b"\r\n" + draw(bodies())


def _theirs_parse(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes] | None:
    try:
        headers, body = dkim.rfc822_parse(message)
    except (dkim.MessageFormatError, IndexError):
        return None
    return [(name, value) for name, value in headers], body


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=messages(with_from=False), junk=st.sampled_from([b"", b"no colon here\r\n", b" folded\r\n",
                                                                b"\x80bad: x\r\n", b"::x\r\n"]))
def test_parse_select_and_canonicalise_are_dkimpys(message: bytes, junk: bytes) -> None:
    message = junk + message
    theirs = _theirs_parse(message)
    if theirs is None:
        with pytest.raises(ValueError):
            parse_message(message)
        return
    headers, body = parse_message(message)
    assert (headers, body) == theirs
    assert relaxed_headers(headers) == [tuple(h) for h in Relaxed.canonicalize_headers(headers)]
    assert simple_headers(headers) == [tuple(h) for h in Simple.canonicalize_headers(headers)]
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)
    assert simple_body(body) == Simple.canonicalize_body(body)
    assert body_digest(body) == hashlib.sha256(Relaxed.canonicalize_body(body)).digest()
    lowered = [name.lower() for name, _ in headers]
    include = [name for name in SIGNED_HEADERS
               for _ in range(lowered.count(name) + (name in OVERSIGNED_HEADERS))] + [b"x-mailer", b"received"]
    assert select_headers(headers, include) == [tuple(h) for h in dkim.select_headers(headers, include)]
    # What sign_all uses: the plan cached per list of field names, the fields canonicalised one by one.
    assert [_relaxed_field(name, value) for name, value in headers] == \
        [name + b":" + value for name, value in Relaxed.canonicalize_headers(headers)]
    if b"from" in lowered:
        h, chosen = _plan(tuple(lowered))
        include = [name for name in SIGNED_HEADERS for _ in range(lowered.count(name) + (name in OVERSIGNED_HEADERS))]
        assert h == b" : ".join(include)
        assert [headers[index] for index in chosen] == [tuple(h) for h in dkim.select_headers(headers, include)]


@settings(max_examples=200, deadline=None)
@given(body=bodies(), tail=st.sampled_from([b"", b" ", b"\t", b"\r\n", b" \r\n", b"\r\n\r\n", b"  \r\n\t\r\n"]))
def test_body_canonicalisation_and_hash_are_dkimpys(body: bytes, tail: bytes) -> None:
    body += tail
    assert relaxed_body(body) == Relaxed.canonicalize_body(body)
    assert simple_body(body) == Simple.canonicalize_body(body)
    assert body_digest(body) == hashlib.sha256(Relaxed.canonicalize_body(body)).digest()


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=messages())
def test_signature_over_generated_messages_is_dkimpys_and_verifies(message: bytes, ed_key: ed25519.Ed25519PrivateKey,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Ed25519 is deterministic: with the same t=, dkimpy's own ``DKIM.sign`` over the
    same h= writes the same field."""
    if _theirs_parse(message) is None or message[:1] in (b" ", b"\t"):
        return
    monkeypatch.setattr(dkim.time, "time", lambda: 1_795_000_000.0)
    pem = ed_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())
    signer = DKIMSigner(domain="example.org", selector="s", private_key=pem, algorithm="ed25519-sha256")
    try:
        ours = sign_all([signer], message)
    except ValueError:
        return  # two of a unique field: refused before signing (test_dkim)
    signed = message if message.endswith(b"\r\n") else message + b"\r\n"  # as SMTP sends it
    assert ours.endswith(signed)
    include = _tag(ours[:-len(signed)], b"h").split(b":")
    seed = base64.b64encode(ed_key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                 serialization.NoEncryption()))
    theirs = dkim.DKIM(signed).sign(b"s", b"example.org", seed, signature_algorithm=b"ed25519-sha256",
                                    canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
    assert ours == theirs + signed
    record = signer.dns_record().encode()
    assert dkim.verify(ours, dnsfunc=lambda name, timeout=5: record)


def test_rsa_signature_over_a_message_full_of_white_space_is_dkimpys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dkim.time, "time", lambda: 1_795_000_000.0)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    signer = DKIMSigner(domain="example.org", selector="s",
                        private_key=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                      serialization.NoEncryption()))
    message = (b"From:\t News \t <a@example.org>  \r\nSubject: a\r\n \tfolded  subject \r\nTO: b@example.net\r\n"
               b"list-unsubscribe: <https://example.org/u>\r\n\r\n  text \t with \r\n\ttabs\t\r\n\r\n\r\n")
    ours = signer.sign(message)
    include = _tag(ours[:-len(message)], b"h").split(b":")
    theirs_key = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                   serialization.NoEncryption())
    theirs = dkim.DKIM(message).sign(b"s", b"example.org", theirs_key, canonicalize=(b"relaxed", b"relaxed"),
                                     include_headers=include)
    assert ours == theirs + message


def _tag(field: bytes, name: bytes) -> bytes:
    unfolded = field.replace(b"\r\n", b"").replace(b"\t", b" ")
    for item in unfolded.split(b":", 1)[1].split(b";"):
        key, _, value = item.strip().partition(b"=")
        if key == name:
            return value.replace(b" ", b"")
    raise AssertionError(f"no {name!r} tag")
