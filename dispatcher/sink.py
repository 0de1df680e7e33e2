"""The local capture server: aiosmtpd writing each message into a Maildir.

Used by ``dispatcher sink`` and by ``dispatcher run`` when no relay is configured.
It advertises PIPELINING (RFC 2920) so the pool runs as it would against a relay.
"""

from __future__ import annotations

import asyncio
import mailbox
from pathlib import Path
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

DEFAULT_MAILDIR = Path("outbox")


class MaildirHandler:
    def __init__(self, maildir: Path) -> None:
        self.maildir = mailbox.Maildir(maildir, create=True)
        self.received = 0

    async def handle_EHLO(
        self, server: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        content = envelope.original_content or b""
        trace = (
            f"Return-Path: <{envelope.mail_from}>\r\n"
            f"X-Envelope-To: {', '.join(envelope.rcpt_tos)}\r\n"
        ).encode("utf-8", "surrogateescape")
        self.maildir.add(trace + content)
        self.received += 1
        return "250 2.0.0 OK: captured"


class CaptureServer:
    """An aiosmtpd server on ``host:port`` (port 0: any free one) in this event loop."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, maildir: Path = DEFAULT_MAILDIR) -> None:
        self.host = host
        self.port = port
        self.maildir = Path(maildir)
        self.handler = MaildirHandler(self.maildir)
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> CaptureServer:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: SMTP(self.handler, hostname="dispatcher-sink", ident="dispatcher sink", data_size_limit=None),
            self.host,
            self.port,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> CaptureServer:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()
