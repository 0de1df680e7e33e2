"""``pool.dkim.DKIMSigner``: every signed message verifies with dkimpy against the
test key's TXT record; altered messages do not; ``h=`` is what docs/campaigns.md lists;
and a signed message sent through a real SMTP server still verifies on arrival."""

from __future__ import annotations

import asyncio
import base64
import json
import pickle
import re
from collections.abc import Callable
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from typing import Any

import aiosmtplib
import dkim  # type: ignore[import-untyped]
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from smtpserver import FaultyServer

from dispatcher.commands.check_config import campaign_lines as _campaign_lines
from dispatcher.compose.jobs import Line
from dispatcher.compose.stage import Composer, Invalid, Ready
from dispatcher.config import Settings
from pool import SMTPPool
from pool.dkim import OVERSIGNED_HEADERS, SIGNED_HEADERS, DKIMSettings, DKIMSigner, sign_all

pytestmark = pytest.mark.timeout(60)

DOMAIN = "example.org"
SELECTOR = "s2026"
ALGORITHMS = ("rsa-sha256", "ed25519-sha256")
_NONE = serialization.NoEncryption()


def pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey,
        fmt: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, fmt, _NONE)


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def keys(rsa_key: rsa.RSAPrivateKey) -> dict[str, bytes]:
    return {"rsa-sha256": pem(rsa_key), "ed25519-sha256": pem(ed25519.Ed25519PrivateKey.generate())}


@pytest.fixture(params=ALGORITHMS)
def signer(request: pytest.FixtureRequest, keys: dict[str, bytes]) -> DKIMSigner:
    return DKIMSigner(domain=DOMAIN, selector=SELECTOR, private_key=keys[request.param], algorithm=request.param)


def dns_for(signer: DKIMSigner) -> Callable[..., bytes | None]:
    """A dkimpy ``dnsfunc`` that knows only the signer's TXT record."""
    record = signer.dns_record().encode()
    wanted = f"{SELECTOR}._domainkey.{DOMAIN}.".encode()

    def lookup(name: bytes, timeout: int = 5) -> bytes | None:
        return record if name == wanted else None

    return lookup


def verifies(message: bytes, signer: DKIMSigner) -> bool:
    return bool(dkim.verify(message, dnsfunc=dns_for(signer)))


def tags(message: bytes) -> dict[str, str]:
    """The DKIM-Signature's tags, unfolded."""
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    found = re.search(r"^DKIM-Signature:(.*?)\r\n(?![ \t])", head + "\r\n", re.DOTALL | re.MULTILINE | re.IGNORECASE)
    assert found, "no DKIM-Signature"
    value = re.sub(r"\s+", "", found.group(1))
    return dict(item.split("=", 1) for item in value.split(";") if item)


def text_message(**extra: str) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"News <news@{DOMAIN}>"
    msg["To"] = "ada@example.net"
    msg["Subject"] = "Welcome"
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain=DOMAIN)
    for name, value in extra.items():
        msg[name.replace("_", "-")] = value
    msg.set_content("Hello Ada,\n\nthanks for signing up.\n")
    return msg


def wire(msg: EmailMessage) -> bytes:
    return msg.as_bytes(policy=msg.policy.clone(linesep="\r\n"))


def multipart_with_attachment() -> EmailMessage:
    msg = text_message(Cc="boss@example.net")
    msg.add_alternative("<p>Hello Ada,</p><p>thanks for signing up.</p>", subtype="html")
    msg.add_attachment(bytes(range(256)) * 40, maintype="application", subtype="octet-stream",
                       filename="data.bin")
    return msg


def non_ascii_headers() -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = f"Zoë Müller <news@{DOMAIN}>"
    msg["To"] = "Inès Dupré <ines@example.net>"
    msg["Subject"] = "Grüße aus Köln — " + "ünïcödé " * 12  # long: folded encoded words
    msg["Date"] = formatdate()
    msg["Message-ID"] = make_msgid(domain=DOMAIN)
    msg.set_content("Schöne Grüße,\nZoë\n")
    return msg


RAW_LF = (b"From: news@example.org\nTo: ada@example.net\nSubject: raw\nMessage-ID: <raw1@example.org>\n"
          b"Date: Wed, 25 Nov 2026 11:00:00 +0000\n\nA raw message with LF line endings.\n.leading dot\n")

MESSAGES: dict[str, Callable[[], bytes]] = {
    "plain text": lambda: wire(text_message()),
    "with unsubscribe headers": lambda: wire(text_message(
        List_Unsubscribe=f"<https://{DOMAIN}/u/1>, <mailto:u@{DOMAIN}>",
        List_Unsubscribe_Post="List-Unsubscribe=One-Click")),
    "multipart with attachment": lambda: wire(multipart_with_attachment()),
    "non-ASCII headers encoded": lambda: wire(non_ascii_headers()),
    "raw bytes, LF line endings": lambda: RAW_LF,
}


@pytest.mark.parametrize("kind", MESSAGES)
def test_every_signed_message_verifies(signer: DKIMSigner, kind: str) -> None:
    signed = signer.sign(MESSAGES[kind]())
    assert signed.startswith(b"DKIM-Signature: ")
    assert verifies(signed, signer)
    found = tags(signed)
    assert found["a"] == signer.algorithm
    assert found["c"] == "relaxed/relaxed"
    assert (found["d"], found["s"]) == (DOMAIN, SELECTOR)


@pytest.mark.parametrize("kind", MESSAGES)
def test_signed_messages_are_crlf_with_short_lines(signer: DKIMSigner, kind: str) -> None:
    signed = signer.sign(MESSAGES[kind]())
    assert signed.count(b"\n") == signed.count(b"\r\n") == signed.count(b"\r")
    assert max(len(line) for line in signed.split(b"\r\n")) <= 998
    signature = signed.split(b"\r\n\r\n", 1)[0].split(b"\r\nFrom:", 1)[0]
    assert max(len(line) for line in signature.split(b"\r\n")) <= 78


_OVERSIGNED = "from:subject:to:cc:reply-to:list-unsubscribe:list-unsubscribe-post"


def test_h_lists_the_spec_headers_present_in_spec_order_then_oversigns(signer: DKIMSigner) -> None:
    msg = text_message(Cc="boss@example.net", Reply_To="help@example.org", X_Campaign="c1",
                       List_Unsubscribe=f"<https://{DOMAIN}/u/1>", In_Reply_To="<a@example.org>",
                       References="<a@example.org>", Feedback_ID="c1:news:example.org", Sender=f"bulk@{DOMAIN}",
                       List_Unsubscribe_Post="List-Unsubscribe=One-Click", List_Id="news.example.org")
    h = tags(signer.sign(wire(msg)))["h"].split(":")
    assert h == [
        "from", "from", "to", "to", "cc", "cc", "subject", "subject", "date", "message-id", "mime-version",
        "content-type", "content-transfer-encoding", "reply-to", "reply-to", "sender", "in-reply-to",
        "references", "list-id", "feedback-id", "list-unsubscribe", "list-unsubscribe",
        "list-unsubscribe-post", "list-unsubscribe-post"]
    # Absent ones are named once all the same, so that none can be added.
    assert tags(signer.sign(RAW_LF))["h"].split(":") == [
        "from", "from", "to", "to", "cc", "subject", "subject", "date", "message-id", "reply-to",
        "list-unsubscribe", "list-unsubscribe-post"]
    assert {name.decode() for name in OVERSIGNED_HEADERS} == set(_OVERSIGNED.split(":"))
    assert [name.decode() for name in SIGNED_HEADERS] == [
        "from", "to", "cc", "subject", "date", "message-id", "mime-version", "content-type",
        "content-transfer-encoding", "reply-to", "sender", "in-reply-to", "references", "list-id", "feedback-id",
        "list-unsubscribe", "list-unsubscribe-post"]


_EVIL = b"<https://evil.example/u>"


@pytest.mark.parametrize(("what", "change"), [
    ("Reply-To replaced", lambda m: m.replace(b"Reply-To: help@example.org", b"Reply-To: evil@evil.example")),
    ("Reply-To added", lambda m: m.replace(b"Reply-To: help@example.org\r\n", b"").replace(
        b"\r\n\r\n", b"\r\nReply-To: evil@evil.example\r\n\r\n", 1)),
    ("Subject prepended", lambda m: b"Subject: Your account is locked\r\n" + m),
    ("Cc prepended", lambda m: b"Cc: evil@evil.example\r\n" + m),
    ("List-Unsubscribe prepended", lambda m: b"List-Unsubscribe: " + _EVIL + b"\r\n" + m),
    ("To prepended", lambda m: b"To: evil@evil.example\r\n" + m),
    ("List-Unsubscribe-Post added", lambda m: m.replace(b"\r\n\r\n", b"\r\nList-Unsubscribe-Post: "
                                                        b"List-Unsubscribe=One-Click\r\n\r\n", 1)),
])
def test_a_header_added_or_replaced_after_signing_does_not_verify(signer: DKIMSigner, what: str,
                                                                   change: Callable[[bytes], bytes]) -> None:
    msg = text_message(Reply_To="help@example.org", List_Unsubscribe=f"<https://{DOMAIN}/u/1>")
    if what != "List-Unsubscribe-Post added":
        msg["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    signed = signer.sign(wire(msg))
    assert verifies(signed, signer)
    altered = change(signed)
    assert altered != signed, what
    assert not verifies(altered, signer), what


def test_each_key_adds_a_signature_and_each_verifies(keys: dict[str, bytes]) -> None:
    ed_key = pem(ed25519.Ed25519PrivateKey.generate())
    rsa_signer = DKIMSigner(domain=DOMAIN, selector=SELECTOR, private_key=keys["rsa-sha256"])
    ed_signer = DKIMSigner(domain=DOMAIN, selector="ed", private_key=ed_key, algorithm="ed25519-sha256")
    signed = sign_all([rsa_signer, ed_signer], wire(text_message()))
    assert signed.count(b"DKIM-Signature:") == 2
    records = {f"{SELECTOR}._domainkey.{DOMAIN}.".encode(): rsa_signer.dns_record().encode(),
               f"ed._domainkey.{DOMAIN}.".encode(): ed_signer.dns_record().encode()}
    verifier = dkim.DKIM(signed)
    for index in range(2):
        assert verifier.verify(idx=index, dnsfunc=lambda name, timeout=5: records.get(name))
    assert [tags_at(signed, i)["a"] for i in range(2)] == ["rsa-sha256", "ed25519-sha256"]


def tags_at(message: bytes, index: int) -> dict[str, str]:
    head = message.split(b"\r\n\r\n", 1)[0].decode()
    found = re.findall(r"^DKIM-Signature:(.*?)\r\n(?![ \t])", head + "\r\n", re.DOTALL | re.MULTILINE)
    value = re.sub(r"\s+", "", found[index])
    return dict(item.split("=", 1) for item in value.split(";") if item)


def test_dkim_may_be_a_list_in_the_config(tmp_path: Path, keys: dict[str, bytes]) -> None:
    (tmp_path / "r.pem").write_bytes(keys["rsa-sha256"])
    (tmp_path / "e.pem").write_bytes(pem(ed25519.Ed25519PrivateKey.generate()))
    settings_ = Settings.model_validate({"dkim": [
        {"domain": DOMAIN, "selector": "r", "private_key": str(tmp_path / "r.pem")},
        {"domain": DOMAIN, "selector": "e", "private_key": str(tmp_path / "e.pem"), "algorithm": "ed25519-sha256"}]})
    composer = Composer(settings_, base_dir=tmp_path, attachments_root=tmp_path)
    line = json.dumps({"id": "j", "from": f"a@{DOMAIN}", "to": ["b@example.net"], "subject": "s",
                       "text": "t"}).encode()
    outcome = composer.compose(Line(1, line, len(line)))
    assert isinstance(outcome, Ready)
    assert outcome.outgoing.message.count(b"DKIM-Signature:") == 2


async def test_pool_signs_with_every_signer(keys: dict[str, bytes], server: FaultyServer) -> None:
    rsa_signer = DKIMSigner(domain=DOMAIN, selector=SELECTOR, private_key=keys["rsa-sha256"])
    ed_signer = DKIMSigner(domain=DOMAIN, selector="ed", private_key=pem(ed25519.Ed25519PrivateKey.generate()),
                           algorithm="ed25519-sha256")
    async with SMTPPool(hostname="127.0.0.1", port=server.port, dkim=[rsa_signer, ed_signer]) as pool:
        await pool.submit(text_message())
    assert server.messages[0].content.count(b"DKIM-Signature:") == 2


@pytest.mark.parametrize(("what", "change"), [
    ("body", lambda m: m.replace(b"thanks for signing up", b"thanks for signing in")),
    ("subject", lambda m: m.replace(b"Subject: Welcome", b"Subject: Welcome!")),
    ("unsubscribe URL", lambda m: m.replace(b"/u/1>", b"/u/2>")),
    ("one-click removed", lambda m: m.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b"")),
    ("From added", lambda m: m.replace(b"\r\n\r\n", b"\r\nFrom: evil@example.net\r\n\r\n", 1)),
    ("line appended", lambda m: m + b"P.S. click here\r\n"),
])
def test_a_message_altered_after_signing_does_not_verify(signer: DKIMSigner, what: str,
                                                         change: Callable[[bytes], bytes]) -> None:
    signed = signer.sign(MESSAGES["with unsubscribe headers"]())
    assert verifies(signed, signer)
    altered = change(signed)
    assert altered != signed, what
    assert not verifies(altered, signer)


def test_relaxed_canonicalisation_survives_refolding_and_trailing_spaces(signer: DKIMSigner) -> None:
    signed = signer.sign(wire(text_message()))
    refolded = signed.replace(b"Subject: Welcome", b"Subject:   Welcome").replace(
        b"thanks for signing up.\r\n", b"thanks for signing up.   \r\n")
    assert refolded != signed and verifies(refolded, signer)


def test_the_wrong_key_does_not_verify(keys: dict[str, bytes]) -> None:
    signer = DKIMSigner(domain=DOMAIN, selector=SELECTOR, private_key=keys["rsa-sha256"])
    other = DKIMSigner(domain=DOMAIN, selector=SELECTOR,
                       private_key=pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    signed = signer.sign(wire(text_message()))
    assert not verifies(signed, other)


# -- keys -------------------------------------------------------------------------


def test_key_formats(rsa_key: rsa.RSAPrivateKey) -> None:
    message = wire(text_message())
    ed = ed25519.Ed25519PrivateKey.generate()
    seed = ed.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, _NONE)
    variants = {
        "RSA PKCS#1": ("rsa-sha256", pem(rsa_key, serialization.PrivateFormat.TraditionalOpenSSL)),
        "RSA PKCS#8 with CRLF": ("rsa-sha256", pem(rsa_key).replace(b"\n", b"\r\n")),
        "Ed25519 PKCS#8": ("ed25519-sha256", pem(ed)),
        "Ed25519 dknewkey seed": ("ed25519-sha256", base64.b64encode(seed) + b"\n"),
    }
    for label, (algorithm, data) in variants.items():
        signer = DKIMSigner(domain=DOMAIN, selector=SELECTOR, private_key=data, algorithm=algorithm)  # type: ignore[arg-type]
        assert verifies(signer.sign(message), signer), label
    assert DKIMSigner(domain=DOMAIN, selector=SELECTOR, private_key=pem(ed),
                      algorithm="ed25519-sha256").dns_record() == (
        "v=DKIM1; k=ed25519; p=" + base64.b64encode(
            ed.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode())


def test_bad_keys_are_clear_errors_without_key_material(rsa_key: rsa.RSAPrivateKey) -> None:
    rsa_pem = pem(rsa_key)
    ed_pem = pem(ed25519.Ed25519PrivateKey.generate())
    encrypted = rsa_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.BestAvailableEncryption(b"secret"))
    cases = [
        (rsa_pem, "ed25519-sha256", "an RSA key, but dkim.algorithm is ed25519-sha256"),
        (ed_pem, "rsa-sha256", "an Ed25519 key, but dkim.algorithm is rsa-sha256"),
        (pem(ec.generate_private_key(ec.SECP256R1())), "rsa-sha256", "but dkim.algorithm is rsa-sha256"),
        (encrypted, "rsa-sha256", "encrypted"),
        (rsa_pem[:200] + rsa_pem[-40:], "rsa-sha256", "not a PEM private key"),
        (b"hello", "rsa-sha256", "not a PEM private key"),
        (b"hello", "ed25519-sha256", "neither a PEM key nor a base64 Ed25519 seed"),
    ]
    body = rsa_pem.split(b"\n")[1].decode()
    for data, algorithm, expected in cases:
        with pytest.raises(ValueError, match=re.escape(expected)) as caught:
            DKIMSigner(domain=DOMAIN, selector=SELECTOR, private_key=data, algorithm=algorithm)  # type: ignore[arg-type]
        assert str(caught.value).startswith("dkim.private_key: ")
        assert body[:20] not in str(caught.value)
    with pytest.raises(ValueError, match=r"dkim\.domain"):
        DKIMSigner(domain="example.org; x=y", selector=SELECTOR, private_key=rsa_pem)
    with pytest.raises(ValueError, match=r"dkim\.algorithm"):
        DKIMSigner(domain=DOMAIN, selector=SELECTOR, private_key=rsa_pem, algorithm="rsa-sha1")  # type: ignore[arg-type]


def test_settings_and_from_settings(tmp_path: Path, keys: dict[str, bytes]) -> None:
    key_file = tmp_path / "s2026.pem"
    key_file.write_bytes(keys["ed25519-sha256"])
    settings = DKIMSettings.model_validate(
        {"domain": DOMAIN, "selector": SELECTOR, "private_key": str(key_file), "algorithm": "ed25519-sha256"})
    signer = DKIMSigner.from_settings(settings)
    assert signer.dns_name == f"{SELECTOR}._domainkey.{DOMAIN}"
    assert verifies(signer.sign(RAW_LF), signer)
    assert DKIMSettings.model_validate({"domain": DOMAIN, "selector": "s", "private_key": "k"}).algorithm == "rsa-sha256"
    for bad, where in (({"domain": DOMAIN, "selector": "s", "private_key": "k", "algo": "x"}, "extra"),
                       ({"domain": DOMAIN, "selector": "s", "private_key": "k", "algorithm": "rsa-sha1"}, "algorithm"),
                       ({"domain": "a b", "selector": "s", "private_key": "k"}, "domain"),
                       ({"domain": DOMAIN, "private_key": "k"}, "selector")):
        with pytest.raises(ValidationError, match=where):
            DKIMSettings.model_validate(bad)
    missing = DKIMSettings(domain=DOMAIN, selector=SELECTOR, private_key=tmp_path / "nope.pem")
    with pytest.raises(ValueError, match=r"^dkim.private_key: cannot read .*nope.pem"):
        DKIMSigner.from_settings(missing)


def test_signer_pickles_and_hides_its_key(signer: DKIMSigner) -> None:
    copy = pickle.loads(pickle.dumps(signer))  # for a build stage in another process
    assert verifies(copy.sign(RAW_LF), signer)
    assert repr(signer) == f"DKIMSigner(domain={DOMAIN!r}, selector={SELECTOR!r}, algorithm={signer.algorithm!r})"


def test_a_message_without_from_is_refused(signer: DKIMSigner) -> None:
    with pytest.raises(ValueError, match="no From header"):
        signer.sign(b"To: a@example.net\r\nSubject: x\r\n\r\nbody\r\n")
    with pytest.raises(ValueError, match="cannot be signed"):
        signer.sign(b"From: a@example.org\r\nthis is not a header\r\n\r\nbody\r\n")


# -- over the wire ----------------------------------------------------------------


@pytest.mark.parametrize("pipelining", [True, False])
async def test_signed_messages_verify_as_the_server_received_them(signer: DKIMSigner, pipelining: bool) -> None:
    async with FaultyServer(pipelining=pipelining) as server:
        for make in MESSAGES.values():
            await aiosmtplib.send(signer.sign(make()), sender=f"news@{DOMAIN}", recipients=["ada@example.net"],
                                  hostname=server.host, port=server.port, timeout=10)
        assert len(server.messages) == len(MESSAGES)
        for kind, received in zip(MESSAGES, server.messages, strict=True):
            assert verifies(received.content, signer), kind


def test_messages_from_the_job_builder_verify(signer: DKIMSigner, tmp_path: Path) -> None:
    from dispatcher.compose.jobs import ComposedJob, build
    from dispatcher.compose.templates import TemplatedJob, Templates, Unsubscribe

    (tmp_path / "w.subject").write_text("Grüße, {{ name }}")
    (tmp_path / "w.text").write_text("Hallo {{ name }},\n" + "eine lange Zeile " * 80 + "\n")
    (tmp_path / "w.html").write_text("<p>Hallo {{ name }}</p>")
    job = TemplatedJob.model_validate({
        "id": "t1", "template": "w", "to": ["Zoë <zoe@example.net>"], "cc": ["x@example.net"],
        "data": {"name": "Zoë"}, "attachments": [{"filename": "résumé.pdf", "content_base64": "JVBERi0xLjQK" * 50}]})
    document = Templates(tmp_path).compose(job, default_from=f"Nëws <news@{DOMAIN}>",
                                           unsubscribe=Unsubscribe(url=f"https://{DOMAIN}/u/{{{{ id }}}}"))
    signed = signer.sign(build(ComposedJob.model_validate(document)).message)
    assert verifies(signed, signer)
    assert tags(signed)["h"] == ("from:from:to:to:cc:cc:subject:subject:date:message-id:mime-version:"
                                 "content-type:reply-to:list-unsubscribe:list-unsubscribe:"
                                 "list-unsubscribe-post:list-unsubscribe-post")


# -- the same signature as dkimpy's own signer ------------------------------------


@pytest.mark.parametrize("kind", MESSAGES)
def test_the_signature_is_byte_for_byte_dkimpys(signer: DKIMSigner, keys: dict[str, bytes], kind: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Only the RSA/Ed25519 step is ours (OpenSSL): with the same t=, dkimpy's own
    ``DKIM.sign`` writes exactly the same field (both signature schemes are deterministic)."""
    monkeypatch.setattr(dkim.time, "time", lambda: 1_795_000_000.0)
    message = MESSAGES[kind]().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    ours = signer.sign(message)
    key = serialization.load_pem_private_key(keys[signer.algorithm], password=None)
    if signer.algorithm == "rsa-sha256":
        theirs_key = pem(key, serialization.PrivateFormat.TraditionalOpenSSL)  # type: ignore[arg-type]
    else:
        theirs_key = base64.b64encode(key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                                        _NONE))
    include = tags(ours)["h"].encode().split(b":")
    theirs = dkim.DKIM(message).sign(SELECTOR.encode(), DOMAIN.encode(), theirs_key,
                                     signature_algorithm=signer.algorithm.encode(),
                                     canonicalize=(b"relaxed", b"relaxed"), include_headers=include)
    assert ours == theirs + message


# -- bad raw input is ValueError, never a crash (docs/library.md promise 16) ---------------

@pytest.mark.parametrize("raw", [
    b" From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n",
    b"\tFrom: a@example.org\r\n\r\nbody\r\n",
    b" folded\nFrom: a@example.org\n\nbody\n",
])
def test_a_folded_first_line_is_value_error(signer: DKIMSigner, raw: bytes) -> None:
    with pytest.raises(ValueError, match="first line"):
        signer.sign(raw)


@pytest.mark.parametrize("field", ["From", "Sender", "To", "Cc", "Subject", "Date", "Message-ID"])
def test_two_of_a_unique_field_is_value_error(signer: DKIMSigner, field: str) -> None:
    raw = (f"From: a@{DOMAIN}\r\nTo: b@example.net\r\n{field.upper()}: one\r\n{field.lower()} : two\r\n\r\nbody\r\n")
    if field in ("From", "To"):
        raw = raw.replace(f"{field.lower()} : two\r\n", "").replace(f"{field.upper()}: one\r\n", f"{field}: two\r\n")
    with pytest.raises(ValueError, match=f"two {field}"):
        signer.sign(raw.encode())


def test_a_field_name_in_the_body_is_not_a_duplicate(signer: DKIMSigner) -> None:
    raw = f"From: a@{DOMAIN}\r\nSubject: s\r\n\r\nFrom: quoted in the body\r\nSubject: too\r\n".encode()
    assert verifies(signer.sign(raw), signer)


_RAW_PIECES = st.sampled_from([
    b"From: a@example.org", b"To: b@example.net", b"Subject: hi", b"Subject: =?utf-8?q?x?=", b"X-A: 1",
    b" folded", b"\tfolded", b"", b"\r\n", b"\n", b"\r", b"\x00", b"\xff\xfe", b":", b"no colon", b"From:",
    b"Date: Mon, 1 Jan 2024 00:00:00 +0000", b"Message-ID: <x@y>", b"Content-Type: text/plain",
    b"body line", b".", b"..", b"X-Long: " + b"y" * 2000, b"h" * 1200 + b": v", b"\xc3\xa9t\xc3\xa9: v",
])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(_RAW_PIECES, st.sampled_from([b"\r\n", b"\n", b"\r", b""])), max_size=20), st.booleans())
def test_signer_returns_signed_bytes_or_raises_value_error(pieces: list[tuple[bytes, bytes]], rsa: bool) -> None:
    raw = b"".join(piece + end for piece, end in pieces)
    signer = _FUZZ_SIGNERS["rsa-sha256" if rsa else "ed25519-sha256"]
    try:
        signed = signer.sign(raw)
    except ValueError:
        return
    assert isinstance(signed, bytes) and signed.startswith(b"DKIM-Signature: ")


_FUZZ_SIGNERS = {
    "rsa-sha256": DKIMSigner(domain=DOMAIN, selector=SELECTOR, algorithm="rsa-sha256",
                             private_key=pem(rsa.generate_private_key(public_exponent=65537, key_size=1024))),
    "ed25519-sha256": DKIMSigner(domain=DOMAIN, selector=SELECTOR, algorithm="ed25519-sha256",
                                 private_key=pem(ed25519.Ed25519PrivateKey.generate())),
}


@pytest.mark.parametrize("raw", [b" X: folded\r\nFrom: a@example.org\r\n\r\nx\r\n",
                                 b"From: a@example.org\r\nFrom: b@example.org\r\n\r\nx\r\n"])
async def test_pool_refuses_bad_raw_messages_with_value_error(raw: bytes, signer: DKIMSigner) -> None:
    for dkim_signer in (None, signer):
        async with SMTPPool(hostname="127.0.0.1", port=9, dkim=dkim_signer) as pool:
            with pytest.raises(ValueError):  # at once: nothing is queued (port 9 has no server)
                async with asyncio.timeout(5):
                    await pool.submit(raw, sender="a@example.org", recipients=["b@example.net"])


@pytest.mark.parametrize(("raw", "reason"), [(" X: folded\r\nFrom: a@example.org\r\n\r\nx\r\n", "first line"),
                                             ("From: a@example.org\r\nSubject: a\r\nSubject: b\r\n\r\nx", "two Subject")])
@pytest.mark.parametrize("sign", [False, True])
def test_bad_raw_job_is_invalid_naming_raw(raw: str, reason: str, sign: bool, tmp_path: Path,
                                           keys: dict[str, bytes]) -> None:
    settings_ = {"dkim": {"domain": DOMAIN, "selector": SELECTOR, "private_key": str(tmp_path / "k.pem")}} if sign else {}
    (tmp_path / "k.pem").write_bytes(keys["rsa-sha256"])
    composer = Composer(Settings.model_validate(settings_), base_dir=tmp_path, attachments_root=tmp_path)
    line = json.dumps({"id": "r", "mail_from": "a@example.org", "rcpt_to": ["b@example.net"], "raw": raw}).encode()
    outcome = composer.compose(Line(1, line, len(line)))
    assert isinstance(outcome, Invalid) and outcome.error.field == "raw" and reason in str(outcome.error)


# -- jobs.headers, DMARC alignment, the TXT record as DNS takes it ---------------------------

def _settings(tmp_path: Path, keys: dict[str, bytes], **jobs: Any) -> Settings:
    (tmp_path / "k.pem").write_bytes(keys["rsa-sha256"])
    return Settings.model_validate({"dkim": {"domain": DOMAIN, "selector": SELECTOR,
                                             "private_key": str(tmp_path / "k.pem")}, "jobs": jobs})


def test_jobs_headers_are_added_to_every_composed_message_and_signed(tmp_path: Path, keys: dict[str, bytes]) -> None:
    settings_ = _settings(tmp_path, keys, headers={"Feedback-ID": "c1:news:example.org", "List-Id": "<news.example.org>"})
    composer = Composer(settings_, base_dir=tmp_path, attachments_root=tmp_path)
    line = json.dumps({"id": "j", "from": f"a@{DOMAIN}", "to": ["b@example.net"], "subject": "s", "text": "t",
                       "headers": {"list-id": "<own.example.org>"}}).encode()
    outcome = composer.compose(Line(1, line, len(line)))
    assert isinstance(outcome, Ready)
    message = outcome.outgoing.message
    assert b"Feedback-ID: c1:news:example.org\r\n" in message
    assert b"list-id: <own.example.org>\r\n" in message and b"news.example.org" not in message  # the job's own wins
    assert {"feedback-id", "list-id"} <= set(tags(message)["h"].split(":"))
    signer = DKIMSigner(domain=DOMAIN, selector=SELECTOR, private_key=keys["rsa-sha256"])
    assert verifies(message, signer)


@pytest.mark.parametrize("headers", [{"Return-Path": "<x@example.org>"}, {"X-A": "a\r\nBcc: x@example.org"},
                                     {"Message-ID": "<fixed@example.org>", "message-id": "<b@example.org>"}])
def test_jobs_headers_are_checked_as_a_jobs_own(headers: dict[str, str]) -> None:
    with pytest.raises(ValidationError, match=r"jobs\.headers"):
        Settings.model_validate({"jobs": {"headers": headers}})


@pytest.mark.parametrize(("default_from", "warned"), [
    (f"News <news@{DOMAIN}>", False), (f"news@mail.{DOMAIN}", False), ("news@example.net", True),
    (f"news@not{DOMAIN}", True)])
def test_check_config_warns_when_from_and_dkim_domain_do_not_align(tmp_path: Path, keys: dict[str, bytes],
                                                                   default_from: str, warned: bool) -> None:
    lines = _campaign_lines(_settings(tmp_path, keys, default_from=default_from))
    assert any(line.startswith("warning:") and "DMARC" in line for line in lines) == warned


def test_the_txt_record_is_split_into_strings_dns_can_hold(tmp_path: Path, keys: dict[str, bytes]) -> None:
    signer = DKIMSigner(domain=DOMAIN, selector=SELECTOR, private_key=keys["rsa-sha256"])
    strings = re.findall(r'"([^"]*)"', signer.dns_txt())
    assert len(signer.dns_record()) > 255 and len(strings) == 2
    assert all(len(s) <= 255 for s in strings) and "".join(strings) == signer.dns_record()
    assert signer.dns_txt() in _campaign_lines(_settings(tmp_path, keys))[1]
