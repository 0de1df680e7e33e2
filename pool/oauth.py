"""OAuth 2.0 login for SMTP: ``AUTH XOAUTH2`` (Google, Microsoft) and ``AUTH OAUTHBEARER``
(RFC 7628), with an access token from a command, a file or a coroutine of yours.

Google Workspace and Microsoft 365 are retiring password logins for SMTP AUTH. Access
tokens live about an hour, so a long run outlives several: ``OAuth2`` keeps the current
one, fetches a new one ``refresh_before`` seconds before it expires, and fetches a new
one at once when the relay refuses a token it took (334/535 after AUTH), then tries
that login once more. Every slot of a pool shares one ``OAuth2``: many sessions opening
at once fetch one token. A token is never logged, and never part of an error message.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Literal

import aiosmtplib
from aiosmtplib import SMTPAuthenticationError

Mechanism = Literal["xoauth2", "oauthbearer"]

#: A fetched token and when it expires (seconds since the epoch; None: ``lifetime`` from now).
Fetched = tuple[str, float | None]

# A relay refusing a token answers 334 (an error challenge, RFC 7628 section 3.2.2) and,
# once the client ends the exchange, 535; some say 454 (temporary failure).
_TOKEN_REFUSED = (334, 454, 535)

__all__ = ["Mechanism", "OAuth2", "TokenError"]


class TokenError(Exception):
    """No access token could be had. ``permanent``: the configuration must change (no
    such command or file); otherwise trying again later may succeed."""

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent


class OAuth2:
    """Where the access token comes from, and how to log in with it.

    Exactly one of ``command`` (run without a shell; its standard output is the token),
    ``file`` (read again when the token is due) or ``fetch`` (a coroutine function of
    yours returning ``(token, expires_at or None)``). Output that is a JSON object is
    read as an OAuth token response: ``access_token`` and ``expires_in`` (seconds), or
    ``expires_on`` (seconds since the epoch). Without an expiry a token is taken to last
    ``lifetime`` seconds. ``mechanism`` is ``"xoauth2"`` or ``"oauthbearer"``.
    """

    def __init__(
        self,
        *,
        command: str | Sequence[str] | None = None,
        file: str | os.PathLike[str] | None = None,
        fetch: Callable[[], Awaitable[Fetched]] | None = None,
        mechanism: Mechanism = "xoauth2",
        lifetime: float = 3600.0,
        refresh_before: float = 300.0,
        timeout: float = 30.0,
    ) -> None:
        if sum(source is not None for source in (command, file, fetch)) != 1:
            raise ValueError("oauth2: give exactly one of command, file, fetch")
        if mechanism not in ("xoauth2", "oauthbearer"):
            raise ValueError(f"oauth2: mechanism must be xoauth2 or oauthbearer, not {mechanism!r}")
        self.command = shlex.split(command) if isinstance(command, str) else list(command or ()) or None
        self.file = Path(file) if file is not None else None
        self._fetch = fetch
        self.mechanism: Mechanism = mechanism
        self.lifetime = lifetime
        self.refresh_before = refresh_before
        self.timeout = timeout
        self.fetches = 0  # tokens fetched so far
        self._token: str | None = None
        self._expires = 0.0
        self._lock: asyncio.Lock | None = None

    def __repr__(self) -> str:  # never the token
        source = (f"command={self.command[0]!r}" if self.command
                  else f"file={str(self.file)!r}" if self.file else "fetch")
        return f"<OAuth2 {self.mechanism} {source} fetches={self.fetches}>"

    async def token(self, *, stale: str | None = None) -> str:
        """The current access token, fetched anew when none is held, when it expires
        within ``refresh_before`` seconds, or when it is ``stale`` (the relay refused
        it). Raises ``TokenError``."""
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # sessions opening at once share one fetch
            fresh = self._token is not None and time.time() < self._expires - self.refresh_before
            if fresh and (stale is None or stale != self._token):
                assert self._token is not None
                return self._token
            token, expires = await self._get()
            self._token, self._expires = token, expires if expires is not None else time.time() + self.lifetime
            self.fetches += 1
            return token

    async def _get(self) -> Fetched:
        if self._fetch is not None:
            return await self._fetch()
        if self.file is not None:
            return _parse(await asyncio.to_thread(_read, self.file), f"oauth2 token file {self.file}")
        assert self.command is not None
        return _parse(await _run(self.command, self.timeout), f"oauth2 token command {self.command[0]!r}")

    async def login(self, client: aiosmtplib.SMTP, username: str, hostname: str, port: int) -> None:
        """AUTH on ``client``'s session (greeted, after TLS) with the current token; once
        more with a new token when the relay refuses it. Raises ``SMTPAuthenticationError``
        (the second refusal), ``SMTPException`` (the mechanism is not offered) or
        ``TokenError``."""
        if self.mechanism not in client.server_auth_methods:
            offered = " ".join(method.upper() for method in client.server_auth_methods) or "none"
            raise aiosmtplib.SMTPException(
                f"the relay does not offer the authentication method {self.mechanism.upper()} (it offers: {offered})")
        token = await self.token()
        try:
            await self._authenticate(client, username, token, hostname, port)
        except SMTPAuthenticationError as exc:
            if exc.code not in _TOKEN_REFUSED:
                raise
            # Expired or revoked since it was fetched: a new token, one more try.
            await self._authenticate(client, username, await self.token(stale=token), hostname, port)

    async def _authenticate(self, client: aiosmtplib.SMTP, username: str, token: str, hostname: str,
                            port: int) -> None:
        if self.mechanism == "xoauth2":
            await client.auth_xoauth2(username, token)
            return
        # RFC 7628 section 3.1: a GS2 header naming the user, then key=value pairs.
        user = username.replace("=", "=3D").replace(",", "=2C")
        payload = f"n,a={user},\x01host={hostname}\x01port={port}\x01auth=Bearer {token}\x01\x01"
        response = await client.execute_command(b"AUTH", b"OAUTHBEARER", base64.b64encode(payload.encode()))
        if response.code == 334:
            # The error challenge (JSON): a lone %x01 ends the exchange (section 3.2.3).
            response = await client.execute_command(base64.b64encode(b"\x01"))
        if response.code != 235:
            raise SMTPAuthenticationError(response.code, response.message)


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise TokenError(f"oauth2 token file {path}: no such file", permanent=True) from None
    except OSError as exc:
        raise TokenError(f"oauth2 token file {path}: cannot read it: {exc.strerror or exc}", permanent=False) from None


async def _run(command: list[str], seconds: float) -> str:
    name = repr(command[0])
    try:
        proc = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE)
    except FileNotFoundError:
        raise TokenError(f"oauth2 token command {name}: no such command", permanent=True) from None
    except OSError as exc:
        raise TokenError(f"oauth2 token command {name}: {exc.strerror or exc}", permanent=True) from None
    try:
        async with asyncio.timeout(seconds):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TokenError(f"oauth2 token command {name}: no token after {seconds:g} s", permanent=False) from None
    except BaseException:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        raise
    if proc.returncode != 0:
        said = err.decode(errors="replace").strip().splitlines()
        raise TokenError(f"oauth2 token command {name} exited {proc.returncode}"
                         + (f": {said[-1][:200]}" if said else ""), permanent=False)
    return out.decode(errors="replace")


def _parse(text: str, source: str) -> Fetched:
    text = text.strip()
    if not text.startswith("{"):
        if not text or any(c.isspace() for c in text):
            raise TokenError(f"{source}: expected one access token, got " + ("nothing" if not text else
                             "several words"), permanent=False)
        return text, None
    try:
        document = json.loads(text)
        token = document.get("access_token") or document.get("accessToken")
        if "expires_in" in document:
            expires: float | None = time.time() + float(document["expires_in"])
        elif "expires_on" in document:
            expires = float(document["expires_on"])
        else:
            expires = None
    except (ValueError, TypeError, AttributeError):
        raise TokenError(f"{source}: not a token nor a JSON token response", permanent=False) from None
    if not isinstance(token, str) or not token:
        raise TokenError(f"{source}: the JSON has no access_token", permanent=False)
    return token, expires
