"""One slot of the pool: the owner of at most one long-lived SMTP session.

aiosmtplib opens every session (TCP, TLS or STARTTLS, EHLO, AUTH); when the server
advertises PIPELINING, ``PipelineProtocol`` then takes over the transport. The pool
creates all ``size`` slots up front and a slot reconnects in place, so sessions can
never outnumber slots (docs/library.md promise 2 by construction; asyncpg's
``PoolConnectionHolder`` is the model). A slot counts as open from the moment it
starts connecting.

State changes only through the methods here::

    CLOSED --connect()--> CONNECTING --> IDLE <--begin()/end()--> BUSY
    any --quit()--> CLOSING --> CLOSED;   any --close()--> CLOSED (at once, no QUIT)
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import ssl
import time
from dataclasses import dataclass, field
from typing import cast

import aiosmtplib
from aiosmtplib import SMTPException, SMTPHeloError, SMTPResponseException

from pool.errors import ConnectionFailed, SessionRefused
from pool.oauth import OAuth2, TokenError
from pool.pipeline import PipelineProtocol
from pool.retry import is_permanent, readable

_ids = itertools.count(1)

Reply = tuple[int, str]

__all__ = ["ConnState", "Connection", "SessionOptions"]


class ConnState(enum.Enum):
    CLOSED = "closed"  # no session
    CONNECTING = "connecting"  # TCP, TLS, EHLO, AUTH under way
    IDLE = "idle"  # a session, waiting for a transaction
    BUSY = "busy"  # a transaction is on the wire
    CLOSING = "closing"  # QUIT under way


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
    oauth2: OAuth2 | None = None  # log in with an access token instead of the password
    pipeline_depth: int = 8  # transactions in flight with BDAT (CHUNKING and PIPELINING)

    @property
    def relay(self) -> str:
        return f"{self.hostname}:{self.port}"


def _cause(exc: BaseException, kind: type[BaseException]) -> BaseException | None:
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None or isinstance(seen, kind):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _classify_connect_error(exc: BaseException, options: SessionOptions) -> ConnectionFailed | SessionRefused:
    """A failed session open: transient (try again later) or permanent (stop: the
    configuration or the relay's policy must change first)."""
    relay = options.relay
    if isinstance(exc, TokenError):
        return SessionRefused(f"relay {relay}: {exc}") if exc.permanent else ConnectionFailed(f"relay {relay}: {exc}")
    verify = _cause(exc, ssl.SSLCertVerificationError)
    if isinstance(verify, ssl.SSLCertVerificationError):
        reason = verify.verify_message or str(verify)
        return SessionRefused(f"relay {relay}: TLS certificate not trusted: {reason} "
                              "(smtp.ca_file names a private CA; validate_certs: false skips the check)")
    if isinstance(exc, SMTPResponseException):
        text = readable(exc.message)
        if isinstance(exc, aiosmtplib.SMTPAuthenticationError) and is_permanent(exc.code):
            return SessionRefused(f"relay {relay} refused the login: {exc.code} {text}", code=exc.code)
        if is_permanent(exc.code):
            return SessionRefused(f"relay {relay} refused the session: {exc.code} {text}", code=exc.code)
        return ConnectionFailed(f"relay {relay} answered {exc.code} {text}", code=exc.code, text=text)
    if isinstance(exc, SMTPException) and "STARTTLS extension not supported" in str(exc):
        return SessionRefused(f"relay {relay} does not offer STARTTLS; the password is never sent in clear "
                              "(start_tls=False, in the config smtp.start_tls: false, allows a plain-text login)")
    if isinstance(exc, SMTPException) and "SMTP AUTH extension is not supported" in str(exc):
        # A username for a relay that takes no login: trying again cannot help.
        return SessionRefused(f"relay {relay} does not offer AUTH (no login is possible on it; "
                              "remove the username, or use TLS if it offers AUTH only there)")
    if isinstance(exc, SMTPException) and "authentication method" in str(exc).lower():
        return SessionRefused(f"relay {relay}: {exc}")
    return ConnectionFailed(f"cannot connect to relay {relay}: {exc}")


async def _login_once(client: aiosmtplib.SMTP, username: str, password: str) -> None:
    """One AUTH attempt, with the first mechanism both sides support. aiosmtplib's
    ``login()`` tries the next mechanism after a refusal (PLAIN, then LOGIN), and a
    lockout policy counts every attempt: a wrong password must cost one."""
    methods = client.supported_auth_methods if client.supports_extension("auth") else []
    if not methods:
        await client.login(username, password)  # raises aiosmtplib's own "not supported" errors
        return
    await getattr(client, f"auth_{methods[0].replace('-', '')}")(username, password)


class Connection:
    """One slot: owns its session and its state. Used by one worker at a time."""

    def __init__(self, options: SessionOptions) -> None:
        self.options = options
        self.id = next(_ids)
        self.state = ConnState.CLOSED
        self.transactions = 0  # on this session
        self.on_the_wire = 0  # transactions begun and not ended (2 when pipelined back to back)
        self.last_used = time.monotonic()
        self.client: aiosmtplib.SMTP | None = None
        self.pipe: PipelineProtocol | None = None
        self.smtputf8 = False
        self.eightbitmime = False
        self.dsn = False  # the relay offers DSN (RFC 3461): MAIL and RCPT may carry RET, ENVID, NOTIFY, ORCPT
        self.chunking = False  # RFC 3030 CHUNKING offered (BDAT)
        self.unclean = False  # a BDAT transaction may have left the server mid-transaction: RSET first
        #: Transactions go as MAIL, RCPT, ``BDAT n LAST`` and the content, several in
        #: flight (RFC 3030 CHUNKING over RFC 2920 PIPELINING). Set by ``connect``.
        self.bdat = False

    def __repr__(self) -> str:
        mode = "pipelined" if self.pipe is not None else "command"
        return f"<Connection #{self.id} {self.state.value} {mode} transactions={self.transactions}>"

    # -- predicates --

    @property
    def is_open(self) -> bool:
        """Counts against ``size``: connecting, holding a session, or quitting."""
        return self.state is not ConnState.CLOSED

    @property
    def is_connected(self) -> bool:
        """Holds a session the server has not closed."""
        if self.state not in (ConnState.IDLE, ConnState.BUSY):
            return False
        if self.pipe is not None:
            return self.pipe.is_connected
        return self.client is not None and self.client.is_connected

    @property
    def pipelined(self) -> bool:
        return self.pipe is not None

    def idle_for(self) -> float:
        return time.monotonic() - self.last_used

    # -- transitions --

    async def connect(self) -> None:
        """Open the session (TLS, STARTTLS, EHLO, AUTH). Raises ConnectionFailed
        (transient) or SessionRefused (permanent: AUTH refused, certificate not
        trusted, STARTTLS missing while a password is set)."""
        o = self.options
        self.close()
        self.state = ConnState.CONNECTING
        start_tls = o.start_tls
        if start_tls is None and o.username is not None and not o.use_tls:
            # docs/library.md promise 11: a password is never sent over a plain connection, so a
            # relay (or a man in the middle) that drops STARTTLS is refused.
            start_tls = True
        client = aiosmtplib.SMTP(
            hostname=o.hostname,
            port=o.port,
            use_tls=o.use_tls,
            start_tls=start_tls,
            validate_certs=o.validate_certs,
            timeout=o.timeout,
            local_hostname=o.local_hostname,
            cert_bundle=o.ca_file,
            tls_context=o.tls_context,
        )
        try:
            await self._open_session(client)
        except (TimeoutError, SMTPException, OSError, TokenError) as exc:
            client.close()
            self.state = ConnState.CLOSED
            raise _classify_connect_error(exc, o) from exc
        except BaseException:
            client.close()
            self.state = ConnState.CLOSED
            raise
        self._established(client)

    async def _open_session(self, client: aiosmtplib.SMTP) -> None:
        """TCP (and TLS or STARTTLS), EHLO, AUTH: aiosmtplib's errors pass through."""
        o = self.options
        await client.connect()
        if client.is_ehlo_or_helo_needed:
            # aiosmtplib greets lazily (implicit TLS, no AUTH); our commands need it now.
            try:
                await client.ehlo()
            except SMTPHeloError:
                await client.helo()
        if o.oauth2 is not None and o.username is not None:
            await o.oauth2.login(client, o.username, o.hostname, o.port)
        elif o.username is not None:
            await _login_once(client, o.username, o.password or "")

    def _established(self, client: aiosmtplib.SMTP) -> None:
        """The session is open: what the relay offers; the pipe takes over when it pipelines."""
        o = self.options
        self.client = client
        self.smtputf8 = client.supports_extension("smtputf8")
        self.eightbitmime = client.supports_extension("8bitmime")
        self.dsn = client.supports_extension("dsn")
        self.chunking = client.supports_extension("chunking")
        self.unclean = False
        self.transactions = 0
        self.last_used = time.monotonic()
        if o.pipelining is not False and client.supports_extension("pipelining"):
            # uvloop's transports are not asyncio.Transport subclasses: no isinstance here.
            transport = cast(asyncio.Transport | None, client.transport)
            if transport is not None:
                self.pipe = PipelineProtocol(transport, o.timeout)
                transport.set_protocol(self.pipe)
        self.bdat = self.chunking and self.pipe is not None and o.pipeline_depth > 1
        self.state = ConnState.IDLE

    def begin(self, now: float) -> None:
        """A transaction starts on this session (at ``now``, ``time.monotonic()``)."""
        self.state = ConnState.BUSY
        self.transactions += 1
        self.on_the_wire += 1
        self.last_used = now

    def end(self, now: float) -> None:
        """A transaction is done (at ``now``); with none left on the wire the session is free."""
        self.last_used = now
        if self.on_the_wire > 0:
            self.on_the_wire -= 1
        if not self.on_the_wire and self.state is ConnState.BUSY:
            self.state = ConnState.IDLE

    async def quit(self) -> None:
        """End the session politely; never raises for a session already gone."""
        client, pipe = self.client, self.pipe
        if client is None:
            self.close()
            return
        self.state = ConnState.CLOSING
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
            self.close()

    def close(self) -> None:
        """Drop the session at once (no QUIT)."""
        client, pipe = self.client, self.pipe
        self.client = self.pipe = None
        self.bdat = False
        self.state = ConnState.CLOSED
        self.on_the_wire = 0
        if pipe is not None:
            pipe.abort()
        if client is not None:
            client.close()
