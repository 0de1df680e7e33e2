"""One long-lived SMTP session: connect, recycle, idle, and the transaction seam.

aiosmtplib opens every session (TCP, TLS or STARTTLS, EHLO, AUTH). A transaction
(MAIL, RCPT..., DATA, content) goes through ``Connection.transaction`` and nowhere
else, so a pipelined engine can replace the command-by-command exchange there.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import SMTPException, SMTPResponseException

from pool.envelope import Envelope
from pool.retry import SERVICE_CLOSING, is_positive

_ids = itertools.count(1)

#: (code, text) of one server reply.
Reply = tuple[int, str]


class ConnectionFailed(Exception):
    """The session is unusable: disconnect, timeout, 421, or a failed connect.

    ``ambiguous`` is True when the end of DATA was sent and its reply never came:
    the server may have accepted the message.
    """

    def __init__(self, reason: str, *, code: int | None = None, ambiguous: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.ambiguous = ambiguous


@dataclass(slots=True)
class TransactionReply:
    """Every reply of one transaction, in order.

    ``rcpt`` has one reply per recipient (empty when MAIL was refused). ``data`` is
    the reply that ended the DATA phase: a refusal of DATA itself, or the reply to
    the end of the content; None when DATA was not sent.
    """

    mail: Reply
    rcpt: list[Reply] = field(default_factory=list)
    data: Reply | None = None


@dataclass(slots=True)
class SessionOptions:
    hostname: str
    port: int
    use_tls: bool
    start_tls: bool | None
    validate_certs: bool
    username: str | None
    password: str | None = field(repr=False)
    timeout: float
    local_hostname: str
    pipelining: bool | None


def _encode_address(address: str, smtputf8: bool) -> tuple[bytes, list[bytes]]:
    try:
        return b"<" + address.encode("ascii") + b">", []
    except UnicodeEncodeError:
        if not smtputf8:
            raise
        return b"<" + address.encode("utf-8") + b">", [b"SMTPUTF8"]


class Connection:
    """Owns one aiosmtplib client for a pool worker. Not shared between tasks."""

    def __init__(self, options: SessionOptions) -> None:
        self.options = options
        self.id = next(_ids)
        self.transactions = 0
        self.last_used = time.monotonic()
        self._client: aiosmtplib.SMTP | None = None

    @property
    def is_open(self) -> bool:
        """Holds a session (perhaps one the server already closed)."""
        return self._client is not None

    @property
    def is_connected(self) -> bool:
        return self._client is not None and self._client.is_connected

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used

    async def connect(self) -> None:
        """Open the session (TLS, STARTTLS, EHLO, AUTH). Raises ConnectionFailed or
        SMTPResponseException (for example 535 on AUTH) on failure."""
        o = self.options
        client = aiosmtplib.SMTP(
            hostname=o.hostname,
            port=o.port,
            use_tls=o.use_tls,
            start_tls=o.start_tls,
            validate_certs=o.validate_certs,
            username=o.username,
            password=o.password,
            timeout=o.timeout,
            local_hostname=o.local_hostname,
        )
        try:
            await client.connect()
        except SMTPResponseException as exc:
            client.close()
            if exc.code == SERVICE_CLOSING or 400 <= exc.code < 500:
                raise ConnectionFailed(f"connect refused: {exc.code} {exc.message}", code=exc.code) from exc
            raise
        except (SMTPException, OSError, asyncio.TimeoutError) as exc:
            client.close()
            raise ConnectionFailed(f"connect failed: {exc}") from exc
        except BaseException:
            client.close()
            raise
        self._client = client
        self.transactions = 0
        self.last_used = time.monotonic()

    async def transaction(self, envelope: Envelope, recipients: tuple[str, ...]) -> TransactionReply:
        """Run one mail transaction for ``recipients``; return every reply.

        Negative replies are returned, not raised. Raises ConnectionFailed when the
        session is lost (it is then closed); the connection is never left
        mid-transaction: a transaction that did not reach the end of DATA is RSET.
        """
        client = self._client
        if client is None or not client.is_connected:
            raise ConnectionFailed("not connected")
        self.transactions += 1
        self.last_used = time.monotonic()
        smtputf8 = client.supports_extension("smtputf8")
        sent_end_of_data = False
        try:
            sender, mail_params = _encode_address(envelope.sender, smtputf8)
            reply = TransactionReply(self._checked(await client.execute_command(b"MAIL", b"FROM:" + sender, *mail_params)))
            if not is_positive(reply.mail[0]):
                await self._reset(client)
                return reply
            for rcpt in recipients:
                address, _ = _encode_address(rcpt, smtputf8)
                reply.rcpt.append(self._checked(await client.execute_command(b"RCPT", b"TO:" + address)))
            if not any(is_positive(code) for code, _ in reply.rcpt):
                await self._reset(client)
                return reply
            start = self._checked(await client.execute_command(b"DATA"))
            if start[0] != 354:
                reply.data = start
                await self._reset(client)
                return reply
            protocol = client.protocol
            if protocol is None:
                raise ConnectionFailed("connection lost before the message content")
            protocol.write(envelope.content)
            sent_end_of_data = True
            response = await protocol.read_response(timeout=self.options.timeout)
            reply.data = self._checked((response.code, response.message))
            return reply
        except ConnectionFailed as exc:
            self.close()
            exc.ambiguous = sent_end_of_data
            raise
        except (SMTPException, OSError, asyncio.TimeoutError) as exc:
            self.close()
            raise ConnectionFailed(f"connection lost: {exc}", ambiguous=sent_end_of_data) from exc
        except BaseException:
            # Cancelled mid-transaction: the session state is unknown, so it is dropped.
            self.close()
            raise
        finally:
            self.last_used = time.monotonic()

    def _checked(self, response: tuple[int, str] | aiosmtplib.SMTPResponse) -> Reply:
        code, text = response[0], response[1]
        if code == SERVICE_CLOSING:
            raise ConnectionFailed(f"{code} {text}", code=code)
        return code, text

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        code, text = self._checked(await client.execute_command(b"RSET"))
        if not is_positive(code):
            raise ConnectionFailed(f"RSET refused: {code} {text}", code=code)

    async def quit(self) -> None:
        """End the session politely; never raises for a session already gone."""
        client, self._client = self._client, None
        if client is None:
            return
        try:
            if client.is_connected:
                await client.quit(timeout=min(self.options.timeout, 5.0))
        except (SMTPException, OSError, asyncio.TimeoutError):
            pass
        finally:
            client.close()

    def close(self) -> None:
        """Drop the session at once (no QUIT)."""
        client, self._client = self._client, None
        if client is not None:
            client.close()
