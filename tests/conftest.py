from __future__ import annotations

import ssl
import sys
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme

sys.path.insert(0, str(Path(__file__).parent))

from smtpserver import FaultyServer

# -- TLS: a private CA (trustme) and a server certificate for 127.0.0.1 ------------------


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def server_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(context)
    return context


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    """The private CA as a PEM file, for a relay's ``ca_file``."""
    bundle = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    return str(bundle)


@pytest.fixture
async def server() -> AsyncIterator[FaultyServer]:
    async with FaultyServer() as srv:
        yield srv


def make_message(
    n: int, to: list[str] | None = None, *, body: str = "Hello.\n", sender: str = "sender@example.org"
) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = ", ".join(to or [f"rcpt{n}@example.net"])
    msg["Subject"] = f"message {n}"
    msg["Message-ID"] = f"<m{n}@test.local>"
    msg.set_content(body)
    return msg


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "main_cf(settings): main.cf settings for the discarding_postfix fixture")


@pytest.fixture
async def discarding_postfix(request: pytest.FixtureRequest) -> AsyncIterator[Any]:
    """A private Postfix (tests/postfixserver.py) that discards all mail;
    ``@pytest.mark.main_cf({...})`` adds main.cf settings."""
    from postfixserver import DISCARD_ALL, start_postfix

    marker = request.node.get_closest_marker("main_cf")
    # Started and stopped from the main thread, blocking the loop for those seconds: a
    # master spawned from a worker thread was seen ignoring 'postfix stop' and never
    # greeting (it inherits that thread's signal mask).
    postfix = start_postfix({**DISCARD_ALL, **(marker.args[0] if marker else {})})
    try:
        yield postfix
    finally:
        postfix.stop()
