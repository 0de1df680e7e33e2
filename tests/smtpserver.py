"""A scriptable SMTP server on 127.0.0.1 for tests and benchmarks.

Built on aiosmtpd and run inside the caller's event loop. It records every session
and every message it accepted, and injects faults by script:

    server = FaultyServer()
    server.faults.refuse_connections = 2      # close the next 2 connections at once
    server.faults.close_after_messages = 3    # answer MAIL with 421 and hang up after 3 per session
    server.faults.drop_after_data = 1         # record the next message, then drop without a reply
    server.faults.data_4xx = 2                # answer the next 2 end-of-DATA with 451
    server.faults.rcpt["bad@x.org"] = "550 5.1.1 No such user"
    server.faults.rcpt_defer["slow@x.org"] = 1  # 450 the first time, then accept
    server.faults.delay = 0.05                # every end-of-DATA reply is this late
    server.faults.mail_delay = 0.05           # every MAIL reply is this late
    server.faults.hang = 1                    # the next end-of-DATA is never answered
    server.faults.chaos = 0.05                # each step faults with this probability
    server.faults.data_reply_raw = b"250 Ok: re\\xe7u"  # raw bytes (not UTF-8) end DATA
    server.faults.data_command_reply = "250 OK"   # DATA answered without a 354
    server.gate = asyncio.Event()             # every end-of-DATA waits for gate.set()
    FaultyServer(oauth_tokens={"tok-1"})      # AUTH XOAUTH2 and OAUTHBEARER take these tokens
    server.oauth_tokens = {"tok-2"}           # ... and from now on only this one (tok-1 expired)
    FaultyServer(chunking=True)               # offers CHUNKING: BDAT (RFC 3030); the end-of-DATA
                                              # faults above apply to BDAT LAST alike

    async with server:                        # listening on server.port
        ...

The record: ``server.messages`` (ReceivedMessage), ``server.sessions`` (SessionRecord),
``server.max_concurrent``, ``server.data_started`` (end-of-DATA seen, reply not yet
sent), and ``await server.wait_for(lambda: ..., timeout)`` to wait on the record
without sleeping.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import ssl
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from email import message_from_bytes
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session


@dataclass
class Faults:
    refuse_connections: int = 0
    greeting_421: int = 0
    close_after_messages: int | None = None
    drop_after_data: int = 0
    drop_before_data_reply_unrecorded: int = 0
    data_4xx: int = 0
    data_5xx: int = 0
    mail_code: str | None = None
    mail_code_times: int | None = None  # answer MAIL with mail_code this many times (None: always)
    rcpt: dict[str, str] = field(default_factory=dict)
    rcpt_defer: dict[str, int] = field(default_factory=dict)
    delay: float = 0.0
    mail_delay: float = 0.0
    hang: int = 0
    chaos: float = 0.0
    seed: int = 1
    data_reply_raw: bytes | None = None  # every end-of-DATA is answered with these bytes (no CRLF)
    data_command_reply: str | None = None  # the DATA command itself is answered with this, no 354


@dataclass
class ReceivedMessage:
    session_id: int
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    reply_dropped: bool = False  # the client never saw our reply: an ambiguous delivery
    mail_options: list[str] = field(default_factory=list)  # MAIL FROM parameters (SMTPUTF8, BODY=...)

    @property
    def message_id(self) -> str | None:
        msg = message_from_bytes(self.content)
        value = msg.get("Message-ID")
        return str(value) if value is not None else None

    def header(self, name: str) -> str | None:
        value = message_from_bytes(self.content).get(name)
        return str(value) if value is not None else None


@dataclass
class SessionRecord:
    session_id: int
    messages: int = 0
    commands: list[str] = field(default_factory=list)
    closed: bool = False
    quit: bool = False
    reads: int = 0  # socket reads: about one per round trip the client made us wait for
    ahead: list[int] = field(default_factory=list)  # per BDAT LAST: bytes of later commands already received


class _Handler:
    def __init__(self, server: FaultyServer) -> None:
        self.server = server

    async def handle_EHLO(
        self, smtp: SMTP, session: Session, envelope: Envelope, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        if not self.server.eightbitmime:
            responses = [line for line in responses if line != "250-8BITMIME"]
        if self.server.pipelining:
            responses = [*responses[:-1], "250-PIPELINING", responses[-1]]
        if self.server.chunking:
            responses = [*responses[:-1], "250-CHUNKING", responses[-1]]
        return responses

    async def handle_MAIL(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        srv, faults = self.server, self.server.faults
        record = srv._record(smtp)
        record.commands.append("MAIL")
        if faults.mail_delay:
            await asyncio.sleep(faults.mail_delay)
        if faults.close_after_messages is not None and record.messages >= faults.close_after_messages:
            return await srv._hang_up(smtp, "421 4.3.2 Session message count reached, closing")
        if srv._roll():
            return await srv._hang_up(smtp, "421 4.3.2 Chaos: service not available")
        if faults.mail_code is not None and faults.mail_code_times != 0:
            if faults.mail_code_times is not None:
                faults.mail_code_times -= 1
            return faults.mail_code
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(
        self, smtp: SMTP, session: Session, envelope: Envelope, address: str, options: list[str]
    ) -> str:
        srv, faults = self.server, self.server.faults
        srv._record(smtp).commands.append("RCPT")
        if address in faults.rcpt:
            return faults.rcpt[address]
        if faults.rcpt_defer.get(address, 0) > 0:
            faults.rcpt_defer[address] -= 1
            return "450 4.2.1 Mailbox busy, try later"
        if srv._roll():
            return srv._rng.choice(["450 4.2.1 Chaos: try later", "550 5.1.1 Chaos: no such user"])
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 2.1.5 OK"

    async def handle_RSET(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        self.server._record(smtp).commands.append("RSET")
        return "250 2.0.0 OK"

    async def handle_DATA(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        srv, faults = self.server, self.server.faults
        record = srv._record(smtp)
        record.commands.append(getattr(smtp, "body_command", "DATA"))
        content = envelope.original_content or b""
        srv.data_started += 1
        srv._changed()
        if srv.gate is not None:
            await srv.gate.wait()
        if faults.delay:
            await asyncio.sleep(faults.delay)
        if faults.hang > 0:
            faults.hang -= 1
            await srv._released.wait()
            return "451 4.3.0 Released"
        fault = srv._rng.choice(["drop", "drop-unrecorded", "451", "554", "slow"]) if srv._roll() else None
        if fault == "slow":
            await asyncio.sleep(0.01)
        if faults.data_4xx > 0 or fault == "451":
            faults.data_4xx = max(0, faults.data_4xx - 1)
            return "451 4.3.0 Try again later"
        if faults.data_5xx > 0 or fault == "554":
            faults.data_5xx = max(0, faults.data_5xx - 1)
            return "554 5.6.0 Message rejected"
        if faults.drop_before_data_reply_unrecorded > 0 or fault == "drop-unrecorded":
            faults.drop_before_data_reply_unrecorded = max(0, faults.drop_before_data_reply_unrecorded - 1)
            srv.replies_dropped += 1
            srv._abort(smtp)
            return "451 never seen"
        dropped = faults.drop_after_data > 0 or fault == "drop"
        srv.messages.append(
            ReceivedMessage(record.session_id, envelope.mail_from, list(envelope.rcpt_tos), content, dropped,
                            list(envelope.mail_options))
        )
        record.messages += 1
        srv._changed()
        if dropped:
            faults.drop_after_data = max(0, faults.drop_after_data - 1)
            srv.replies_dropped += 1
            srv._abort(smtp)
            return "250 never seen"
        if faults.data_reply_raw is not None:
            return faults.data_reply_raw  # type: ignore[return-value]  # aiosmtpd pushes bytes as they are
        return "250 2.0.0 OK queued"

    async def handle_QUIT(self, smtp: SMTP, session: Session, envelope: Envelope) -> str:
        self.server._record(smtp).quit = True
        return "221 2.0.0 Bye"


class _SMTP(SMTP):
    """aiosmtpd's session, with connection accounting for the test record."""

    def __init__(self, server: FaultyServer) -> None:
        auth: dict[str, Any] = {}
        if server.credentials is not None or server.oauth_tokens is not None:
            auth = {"auth_required": True, "auth_require_tls": False, "authenticator": server._authenticate,
                    "auth_exclude_mechanism": [] if server.oauth_tokens is not None else ["XOAUTH2", "OAUTHBEARER"]}
        super().__init__(
            _Handler(server),
            hostname="test.local",
            ident="faulty",
            data_size_limit=None,
            tls_context=server.starttls_context,
            enable_SMTPUTF8=server.smtputf8,
            **auth,
        )
        self._test_server = server

    # OAuth 2.0 (aiosmtpd discovers auth_* methods; excluded unless oauth_tokens is set).
    # On a bad token both send an error challenge (334, JSON), read the client's answer,
    # then refuse with 535, as Gmail and Microsoft 365 do.

    async def auth_XOAUTH2(self, _: Any, args: list[str]) -> AuthResult:
        fields = self._sasl_fields(args)
        user = fields.get("user", "")
        return await self._check_token("XOAUTH2", user, fields.get("auth", ""), expected_answer=b"")

    async def auth_OAUTHBEARER(self, _: Any, args: list[str]) -> AuthResult:
        fields = self._sasl_fields(args)
        gs2 = fields.get("", "")  # "n,a=user," (RFC 7628 section 3.1)
        user = gs2.split(",")[1][2:].replace("=2C", ",").replace("=3D", "=") if gs2.count(",") >= 2 else ""
        return await self._check_token("OAUTHBEARER", user, fields.get("auth", ""), expected_answer=b"\x01")

    @staticmethod
    def _sasl_fields(args: list[str]) -> dict[str, str]:
        try:
            raw = base64.b64decode(args[1], validate=True).decode() if len(args) == 2 else ""
        except ValueError:
            return {}
        parts = raw.split("\x01")
        fields = {"": parts[0]} if "=" not in parts[0] or parts[0].startswith("n,") else {}
        for part in parts:
            key, sep, value = part.partition("=")
            if sep and key and not part.startswith("n,"):
                fields[key] = value
        return fields

    async def _check_token(self, mechanism: str, user: str, auth: str, expected_answer: bytes) -> AuthResult:
        srv = self._test_server
        token = auth.removeprefix("Bearer ")
        ok = srv.oauth_tokens is not None and auth.startswith("Bearer ") and token in srv.oauth_tokens
        srv.oauth_attempts.append((mechanism, user, token, ok))
        if ok:
            return AuthResult(success=True, auth_data=LoginPassword(user.encode(), b""))
        error = json.dumps({"status": "401", "schemes": "bearer", "scope": "https://mail.google.com/"})
        answer = await self.challenge_auth(error)
        srv.oauth_error_answers.append(answer if isinstance(answer, bytes) else None)
        if answer != expected_answer:
            return AuthResult(success=False, handled=False, message="501 5.5.2 Bad answer to the error challenge")
        return AuthResult(success=False, handled=False, message="535 5.7.8 Username and Password not accepted")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        srv = self._test_server
        srv.connections_made += 1
        faults = srv.faults
        if faults.refuse_connections > 0 or (srv._roll() and srv._rng.random() < 0.5):
            faults.refuse_connections = max(0, faults.refuse_connections - 1)
            srv.connections_refused += 1
            transport.abort()
            return
        if self.transport is None:
            srv._open += 1
            srv.max_concurrent = max(srv.max_concurrent, srv._open)
            record = SessionRecord(len(srv.sessions) + 1)
            srv.sessions.append(record)
            srv._by_protocol[id(self)] = record
            srv._protocols.add(self)
        super().connection_made(transport)
        if faults.greeting_421 > 0:
            faults.greeting_421 -= 1
            transport.write(b"421 4.3.2 Not now\r\n")
            transport.close()

    body_command = "DATA"  # or BDAT, while BDAT LAST hands the message to handle_DATA
    _bdat_failed = False  # RFC 3030: after a refused BDAT the state is undetermined until RSET
    _chunks: list[bytes] | None = None

    async def smtp_BDAT(self, arg: str) -> None:
        """RFC 3030 BDAT (aiosmtpd has none): ``BDAT size [LAST]`` then exactly
        ``size`` octets, read whatever the state. The message goes through handle_DATA
        at LAST, so every end-of-DATA fault applies. After a refusal, the envelope is
        kept as it was (a next MAIL is "nested") until RSET, as RFC 3030 allows."""
        srv = self._test_server
        if not srv.chunking:
            await self.push("500 5.5.1 Error: command not recognized")
            return
        words = arg.split()
        if not 1 <= len(words) <= 2 or not words[0].isdigit() or (len(words) == 2 and words[1].upper() != "LAST"):
            await self.push("501 5.5.4 Syntax: BDAT size [LAST]")
            return
        size, last = int(words[0]), len(words) == 2
        record = srv._record(self)
        try:
            chunk = await self._reader.readexactly(size)
        except asyncio.IncompleteReadError:
            return  # the client went away mid-chunk
        assert self.envelope is not None
        if self._bdat_failed or not self.envelope.mail_from or not self.envelope.rcpt_tos:
            self._bdat_failed = True
            record.commands.append("BDAT")
            await self.push("554 5.5.1 Error: no valid recipients" if self.envelope.mail_from
                            else "503 5.5.1 Error: need MAIL command")
            return
        self._chunks = [*(self._chunks or []), chunk]
        if not last:
            await self.push(f"250 2.0.0 {size} octets received")
            return
        record.ahead.append(len(self._reader._buffer))  # type: ignore[attr-defined]  # pipelined behind it
        self.envelope.original_content = self.envelope.content = b"".join(self._chunks)
        self._chunks = None
        self.body_command = "BDAT"
        try:
            status = await self.event_handler.handle_DATA(self, self.session, self.envelope)
        finally:
            self.body_command = "DATA"
        await self.push(status)
        if (status if isinstance(status, bytes) else status.encode()).startswith(b"2"):
            self._set_post_data_state()
        else:
            self._bdat_failed = True

    async def smtp_RSET(self, arg: str) -> None:
        self._bdat_failed = False
        self._chunks = None
        await super().smtp_RSET(arg)

    async def smtp_DATA(self, arg: str) -> None:
        reply = self._test_server.faults.data_command_reply
        if reply is not None and self.envelope is not None and self.envelope.rcpt_tos:
            self._test_server._record(self).commands.append("DATA")
            await self.push(reply)  # a broken server: no 354, and no content is read
            return
        await super().smtp_DATA(arg)

    def data_received(self, data: bytes) -> None:
        record = self._test_server._by_protocol.get(id(self))
        if record is not None:
            record.reads += 1
        super().data_received(data)

    def connection_lost(self, error: Exception | None) -> None:
        srv = self._test_server
        record = srv._by_protocol.pop(id(self), None)
        if record is not None:
            record.closed = True
            srv._open -= 1
            srv._protocols.discard(self)
            srv._changed()
        if self.session is not None:
            super().connection_lost(error)


class FaultyServer:
    """An aiosmtpd server on 127.0.0.1 with a fault script and a record of what it received."""

    def __init__(
        self,
        *,
        port: int = 0,
        pipelining: bool = True,
        faults: Faults | None = None,
        starttls_context: ssl.SSLContext | None = None,
        tls_context: ssl.SSLContext | None = None,
        credentials: tuple[str, str] | None = None,
        smtputf8: bool = False,
        eightbitmime: bool = True,
        oauth_tokens: set[str] | None = None,
        chunking: bool = False,
    ) -> None:
        """``starttls_context`` offers STARTTLS; ``tls_context`` makes the port implicit
        TLS; ``credentials`` (user, password) makes AUTH required."""
        self.starttls_context = starttls_context
        self.tls_context = tls_context
        self.credentials = credentials
        self.smtputf8 = smtputf8  # advertise SMTPUTF8 (RFC 6531)
        self.eightbitmime = eightbitmime  # advertise 8BITMIME (RFC 6152)
        self.chunking = chunking  # advertise CHUNKING and take BDAT (RFC 3030)
        self.auth_attempts: list[tuple[str, bool]] = []
        self.oauth_tokens = oauth_tokens  # AUTH XOAUTH2 / OAUTHBEARER accept these (None: not offered)
        self.oauth_attempts: list[tuple[str, str, str, bool]] = []  # mechanism, user, token, accepted
        self.oauth_error_answers: list[bytes | None] = []  # what the client said to each error challenge
        self.host = "127.0.0.1"
        self.port = port
        self.pipelining = pipelining
        self.faults = faults or Faults()
        self.messages: list[ReceivedMessage] = []
        self.sessions: list[SessionRecord] = []
        self.connections_made = 0
        self.data_started = 0
        self.replies_dropped = 0  # end-of-DATA never answered: what a client counts as ambiguous
        self.gate: asyncio.Event | None = None
        self.connections_refused = 0
        self.max_concurrent = 0
        self._open = 0
        self._by_protocol: dict[int, SessionRecord] = {}
        self._protocols: set[_SMTP] = set()
        self._server: asyncio.AbstractServer | None = None
        self._released = asyncio.Event()
        self._change = asyncio.Event()
        self._rng = random.Random(self.faults.seed)

    @property
    def open_connections(self) -> int:
        return self._open

    async def start(self) -> FaultyServer:
        loop = asyncio.get_running_loop()
        self._released = asyncio.Event()
        self._change = asyncio.Event()
        self._rng = random.Random(self.faults.seed)
        self._server = await loop.create_server(lambda: _SMTP(self), self.host, self.port, ssl=self.tls_context)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self._released.set()
        if self.gate is not None:
            self.gate.set()
        if self._server is not None:
            self._server.close()
            for proto in list(self._protocols):
                if proto.transport is not None:
                    proto.transport.abort()
            await self._server.wait_closed()
            self._server = None

    async def __aenter__(self) -> FaultyServer:
        return await self.start()

    async def __aexit__(self, *exc: Any) -> None:
        await self.stop()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds for the record; raise TimeoutError after ``timeout``."""
        async with asyncio.timeout(timeout):
            while not predicate():
                await self._change.wait()

    def deliveries(self) -> Counter[tuple[str | None, str]]:
        """How many times each (Message-ID, recipient) was accepted by this server."""
        counts: Counter[tuple[str | None, str]] = Counter()
        for message in self.messages:
            mid = message.message_id
            for rcpt in message.rcpt_tos:
                counts[(mid, rcpt)] += 1
        return counts

    # -- internals used by the handler --

    def _authenticate(
        self, smtp: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: Any
    ) -> AuthResult:
        login = auth_data.login.decode() if isinstance(auth_data, LoginPassword) else ""
        password = auth_data.password.decode() if isinstance(auth_data, LoginPassword) else ""
        ok = self.credentials is not None and (login, password) == self.credentials
        self.auth_attempts.append((login, ok))
        return AuthResult(success=ok, handled=False)

    def _record(self, smtp: SMTP) -> SessionRecord:
        return self._by_protocol.get(id(smtp)) or SessionRecord(0)

    def _roll(self) -> bool:
        return self.faults.chaos > 0 and self._rng.random() < self.faults.chaos

    def _abort(self, smtp: SMTP) -> None:
        if smtp.transport is not None:
            smtp.transport.abort()

    async def _hang_up(self, smtp: SMTP, reply: str) -> str:
        await smtp.push(reply)
        if smtp.transport is not None:
            smtp.transport.close()
        return reply

    def _changed(self) -> None:
        self._change.set()
        self._change = asyncio.Event()
