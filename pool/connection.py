"""One long-lived SMTP session: connect, recycle, idle, and the transaction seam.

aiosmtplib opens every session (TCP, TLS or STARTTLS, EHLO, AUTH). A transaction goes
through ``Connection.start`` and ``Transaction.finish`` and nowhere else:

- command by command (aiosmtplib): ``start`` runs MAIL, each RCPT, DATA and the
  content, one reply at a time; ``finish`` has nothing left to wait for.
- pipelined (RFC 2920, when the server advertises PIPELINING and ``pipelining`` is not
  False): ``start`` writes MAIL, every RCPT and DATA in one write, reads their replies,
  writes the content after the 354 and returns at once; ``finish`` reads the reply to
  the end of DATA. A worker that starts the next transaction before finishing this
  one puts the end of DATA and the next envelope on the wire together: one round
  trip per message.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from dataclasses import dataclass, field

import aiosmtplib
from aiosmtplib import SMTPException, SMTPHeloError, SMTPResponseException

from pool.envelope import END_OF_DATA, Envelope
from pool.pipeline import PipelineProtocol
from pool.results import ConnectionFailed
from pool.retry import SERVICE_CLOSING, is_positive

_ids = itertools.count(1)

#: (code, text) of one server reply.
Reply = tuple[int, str]

__all__ = ["Connection", "ConnectionFailed", "SessionOptions", "Transaction", "TransactionReply"]


@dataclass(slots=True)
class TransactionReply:
    """Every reply of one transaction, in order.

    ``rcpt`` has one reply per recipient (empty when MAIL was refused and the
    recipients were not sent). ``data`` is the reply that ended the DATA phase: a
    refusal of DATA itself, or the reply to the end of the content; None when DATA
    was not sent.
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
    ca_file: str | None = None
    tls_context: ssl.SSLContext | None = None


class Transaction:
    """A transaction whose content may still be awaiting its reply."""

    __slots__ = ("reply", "_connection", "_pipe", "_final")

    def __init__(
        self,
        reply: TransactionReply,
        connection: Connection | None = None,
        pipe: PipelineProtocol | None = None,
        final: asyncio.Future[list[Reply]] | None = None,
    ) -> None:
        self.reply = reply
        self._connection = connection
        self._pipe = pipe  # the session it ran on, even if the connection has moved on
        self._final = final

    @property
    def open(self) -> bool:
        """The end of DATA is on the wire and its reply not yet read."""
        return self._final is not None

    async def finish(self) -> TransactionReply:
        """Every reply of the transaction. Raises ConnectionFailed (ambiguous) when the
        session is lost before the reply to the end of DATA."""
        final, self._final = self._final, None
        if final is None:
            return self.reply
        connection, pipe = self._connection, self._pipe
        assert connection is not None and pipe is not None
        replies = await connection._await_replies(pipe, final, ambiguous=True)
        self.reply.data = self._connection._checked(replies[0])
        return self.reply


def _address(address: str, smtputf8: bool) -> tuple[bytes, bytes]:
    """``<address>`` for MAIL/RCPT, and the SMTPUTF8 parameter when one is needed."""
    try:
        return b"<" + address.encode("ascii") + b">", b""
    except UnicodeEncodeError:
        if not smtputf8:
            raise
        return b"<" + address.encode("utf-8") + b">", b" SMTPUTF8"


class Connection:
    """Owns one SMTP session for a pool worker. Not shared between tasks."""

    def __init__(self, options: SessionOptions) -> None:
        self.options = options
        self.id = next(_ids)
        self.transactions = 0
        self.last_used = time.monotonic()
        self._client: aiosmtplib.SMTP | None = None
        self._pipe: PipelineProtocol | None = None
        self._smtputf8 = False

    @property
    def is_open(self) -> bool:
        """Holds a session (perhaps one the server already closed)."""
        return self._client is not None

    @property
    def is_connected(self) -> bool:
        if self._pipe is not None:
            return self._pipe.is_connected
        return self._client is not None and self._client.is_connected

    @property
    def pipelined(self) -> bool:
        return self._pipe is not None

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used

    async def connect(self) -> None:
        """Open the session (TLS, STARTTLS, EHLO, AUTH). Raises ConnectionFailed, or
        SMTPResponseException for a permanent refusal such as 535 on AUTH."""
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
            cert_bundle=o.ca_file,
            tls_context=o.tls_context,
        )
        try:
            await client.connect()
            if client.is_ehlo_or_helo_needed:
                # aiosmtplib greets lazily (implicit TLS, no AUTH); our commands need it now.
                try:
                    await client.ehlo()
                except SMTPHeloError:
                    await client.helo()
        except SMTPResponseException as exc:
            client.close()
            if 400 <= exc.code < 500:
                raise ConnectionFailed(f"connect refused: {exc.code} {exc.message}", code=exc.code) from exc
            raise
        except (SMTPException, OSError, asyncio.TimeoutError) as exc:
            client.close()
            raise ConnectionFailed(f"connect failed: {exc}") from exc
        except BaseException:
            client.close()
            raise
        self._client = client
        self._smtputf8 = client.supports_extension("smtputf8")
        self.transactions = 0
        self.last_used = time.monotonic()
        if o.pipelining is not False and client.supports_extension("pipelining"):
            transport = client.transport
            if transport is not None:
                self._pipe = PipelineProtocol(transport, o.timeout)
                transport.set_protocol(self._pipe)

    async def start(self, envelope: Envelope, recipients: tuple[str, ...]) -> Transaction:
        """Begin a transaction for ``recipients``; see the module docstring.

        Negative replies are returned, not raised, and a transaction that did not
        reach the end of DATA is RSET, so the session is never left mid-transaction.
        Raises ConnectionFailed (and closes the session) when the session is lost.
        """
        if not self.is_connected:
            self.close()
            raise ConnectionFailed("not connected")
        self.transactions += 1
        self.last_used = time.monotonic()
        try:
            if self._pipe is not None:
                return await self._start_pipelined(self._pipe, envelope, recipients)
            assert self._client is not None
            return Transaction(await self._command_by_command(self._client, envelope, recipients))
        except ConnectionFailed:
            self.close()
            raise
        except (SMTPException, OSError, asyncio.TimeoutError) as exc:
            self.close()
            raise ConnectionFailed(f"connection lost: {exc}") from exc
        except BaseException:
            # Cancelled or a bug mid-transaction: the session state is unknown, so it goes.
            self.close()
            raise

    # -- pipelined (RFC 2920) --

    async def _start_pipelined(
        self, pipe: PipelineProtocol, envelope: Envelope, recipients: tuple[str, ...]
    ) -> Transaction:
        sender, param = _address(envelope.sender, self._smtputf8)
        commands = [b"MAIL FROM:" + sender + param + b"\r\n"]
        for rcpt in recipients:
            commands.append(b"RCPT TO:" + _address(rcpt, self._smtputf8)[0] + b"\r\n")
        commands.append(b"DATA\r\n")
        replies = await self._await_replies(pipe, pipe.send(b"".join(commands), len(commands)))
        for code_text in replies:
            self._checked(code_text)
        reply = TransactionReply(replies[0], replies[1:-1])
        data_start = replies[-1]
        if data_start[0] != 354:
            if is_positive(reply.mail[0]) and any(is_positive(c) for c, _ in reply.rcpt):
                reply.data = data_start
            await self._reset_pipelined(pipe)
            return Transaction(reply)
        if not is_positive(reply.mail[0]) or not any(is_positive(c) for c, _ in reply.rcpt):
            # RFC 2920 section 3.1: DATA accepted with no valid recipient; end it
            # with no content and take no delivery from it.
            self._checked((await self._await_replies(pipe, pipe.send(END_OF_DATA, 1)))[0])
            return Transaction(reply)
        # Not flushed here: the next transaction's envelope, or finish(), sends it.
        return Transaction(reply, self, pipe, pipe.send(envelope.content, 1))

    async def _reset_pipelined(self, pipe: PipelineProtocol) -> None:
        code, text = self._checked((await self._await_replies(pipe, pipe.send(b"RSET\r\n", 1)))[0])
        if not is_positive(code):
            raise ConnectionFailed(f"RSET refused: {code} {text}", code=code)

    async def _await_replies(
        self, pipe: PipelineProtocol, future: asyncio.Future[list[Reply]], *, ambiguous: bool = False
    ) -> list[Reply]:
        """Wait for ``future``'s replies, flushing what is queued if they are not in yet
        (already-arrived replies leave the next content queued, to share a write with
        the next envelope). The protocol's own timer ends a silent session."""
        try:
            if future.done():
                return future.result()
            await pipe.flush()
            return await future
        except ConnectionFailed as exc:
            self.close()
            exc.ambiguous = ambiguous
            raise
        except BaseException:
            self.close()
            raise
        finally:
            self.last_used = time.monotonic()

    # -- command by command (aiosmtplib) --

    async def _command_by_command(
        self, client: aiosmtplib.SMTP, envelope: Envelope, recipients: tuple[str, ...]
    ) -> TransactionReply:
        sender, param = _address(envelope.sender, self._smtputf8)
        mail_args = [b"FROM:" + sender] + ([param.strip()] if param else [])
        reply = TransactionReply(self._checked(await client.execute_command(b"MAIL", *mail_args)))
        if not is_positive(reply.mail[0]):
            await self._reset(client)
            return reply
        for rcpt in recipients:
            address = _address(rcpt, self._smtputf8)[0]
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
        # aiosmtplib's data() would normalise and dot-stuff again; the envelope's
        # content is already wire-ready, so it is written as it is.
        protocol.write(envelope.content)
        try:
            response = await protocol.read_response(timeout=self.options.timeout)
        except (SMTPException, OSError, asyncio.TimeoutError) as exc:
            raise ConnectionFailed(f"connection lost after the end of DATA: {exc}", ambiguous=True) from exc
        reply.data = self._checked((response.code, response.message))
        return reply

    async def _reset(self, client: aiosmtplib.SMTP) -> None:
        code, text = self._checked(await client.execute_command(b"RSET"))
        if not is_positive(code):
            raise ConnectionFailed(f"RSET refused: {code} {text}", code=code)

    def _checked(self, response: tuple[int, str]) -> Reply:
        code, text = response[0], response[1]
        if code == SERVICE_CLOSING:
            # 421 (RFC 5321 section 3.8): the server is closing the channel. A 421
            # to the end of DATA is a refusal of the message, not an ambiguity.
            raise ConnectionFailed(f"{code} {text}", code=code)
        return code, text

    # -- end of the session --

    async def quit(self) -> None:
        """End the session politely; never raises for a session already gone."""
        client, pipe = self._client, self._pipe
        self._client = self._pipe = None
        if client is None:
            return
        try:
            if pipe is not None:
                if pipe.is_connected:
                    quit_reply = pipe.send(b"QUIT\r\n", 1)
                    async with asyncio.timeout(min(self.options.timeout, 5.0)):
                        await pipe.flush()
                        await quit_reply
            elif client.is_connected:
                await client.quit(timeout=min(self.options.timeout, 5.0))
        except (ConnectionFailed, SMTPException, OSError, TimeoutError):
            pass
        finally:
            if pipe is not None:
                pipe.abort()
            client.close()

    def close(self) -> None:
        """Drop the session at once (no QUIT)."""
        client, pipe = self._client, self._pipe
        self._client = self._pipe = None
        if pipe is not None:
            pipe.abort()
        if client is not None:
            client.close()

