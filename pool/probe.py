"""Open one session to a relay exactly as the pool would, say what it offers, QUIT.

Nothing is sent: no MAIL, no RCPT. ``dispatcher check-config --connect`` uses it to
test a configuration against the relay before a run; a failure carries the same
reason a run would stop with (certificate, login, STARTTLS missing).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pool.connection import Connection, SessionOptions
from pool.errors import ConnectionFailed, RelayError, SessionRefused

#: The extensions worth knowing about before a run, in the order they are shown.
EXTENSIONS = ("PIPELINING", "SIZE", "8BITMIME", "SMTPUTF8", "DSN", "CHUNKING")

__all__ = ["EXTENSIONS", "RelayInfo", "probe_session"]


@dataclass(frozen=True, slots=True)
class RelayInfo:
    """What one session with the relay showed."""

    relay: str  # host:port
    tls: str  # "implicit TLS", "STARTTLS" or "none"
    tls_version: str | None  # e.g. "TLSv1.3"
    certificate: str  # "verified", "not verified (validate_certs: false)", ... or "" without TLS
    login: str | None  # the username that logged in; None without AUTH
    login_mechanism: str | None  # "XOAUTH2" or "OAUTHBEARER" with smtp.oauth2; None with a password
    auth_methods: tuple[str, ...]  # what the relay offers after TLS, e.g. ("PLAIN", "LOGIN")
    extensions: dict[str, str] = field(default_factory=dict)  # EHLO keyword (upper case) -> its parameters
    elapsed: float = 0.0  # seconds to open the session (connect, TLS, EHLO, AUTH)

    def offers(self, extension: str) -> str | None:
        """The extension's parameters ("" when it has none), or None when not offered."""
        return self.extensions.get(extension.upper())


async def probe_session(options: SessionOptions) -> RelayInfo:
    """Open a session with ``options`` (TCP, TLS or STARTTLS, EHLO, AUTH), read what it
    offers, QUIT. Raises ``RelayError``: ``transient=False`` when the relay refuses the
    session for good (as it would stop a pool), ``transient=True`` when it cannot be
    reached now. One attempt, bounded by ``options.timeout`` per step."""
    connection = Connection(options)
    start = time.monotonic()
    try:
        await connection.connect()
    except SessionRefused as exc:
        raise RelayError(exc.reason, transient=False, relay=options.relay, code=exc.code) from exc
    except ConnectionFailed as exc:
        raise RelayError(exc.reason, transient=True, relay=options.relay, code=exc.code) from exc
    elapsed = time.monotonic() - start
    try:
        client = connection.client
        assert client is not None  # connect() succeeded
        ssl_object = client.get_transport_info("ssl_object")
        if ssl_object is None:
            tls, certificate = "none", ""
        else:
            tls = "implicit TLS" if options.use_tls else "STARTTLS"
            certificate = ("checked by tls_context" if options.tls_context is not None
                           else "verified" if options.validate_certs else "not verified (validate_certs: false)")
        return RelayInfo(
            relay=options.relay,
            tls=tls,
            tls_version=ssl_object.version() if ssl_object is not None else None,
            certificate=certificate,
            login=options.username,
            login_mechanism=options.oauth2.mechanism.upper() if options.oauth2 is not None else None,
            auth_methods=tuple(method.upper() for method in client.server_auth_methods),
            extensions={name.upper(): params for name, params in client.esmtp_extensions.items()},
            elapsed=elapsed,
        )
    finally:
        await connection.quit()
