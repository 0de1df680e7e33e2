from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from smtpserver import FaultyServer


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
