"""``dispatcher check-config FILE --connect``: one session with each configured relay.

Each relay's session opens exactly as ``run`` would open it (TLS or STARTTLS, EHLO,
AUTH), shows what the relay offers, and QUITs; nothing is sent. A relay that refuses
the session is reported with the reason ``run`` would stop with.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from dispatcher.config import Settings
from pool import RelayError, SMTPPool
from pool.probe import EXTENSIONS, RelayInfo


@dataclass(frozen=True, slots=True)
class Checked:
    """One relay's answer: what it offers, or why no session opened."""

    name: str  # the relay's name under relays:, else host:port
    info: RelayInfo | None
    error: RelayError | None


async def check_relays(settings: Settings) -> list[Checked]:
    """Probe every configured relay at once; in the configuration's order. Empty when
    no relay is configured (the built-in capture server needs no check)."""
    if settings.relays:
        targets = {relay.name: SMTPPool.from_settings(relay, relay.pool, settings.retry) for relay in settings.relays}
    elif settings.smtp is not None:
        targets = {f"{settings.smtp.hostname}:{settings.smtp.port}":
                   SMTPPool.from_settings(settings.smtp, settings.pool, settings.retry)}
    else:
        return []

    async def check(name: str, pool: SMTPPool) -> Checked:
        try:
            return Checked(name, await pool.probe(), None)
        except RelayError as exc:
            return Checked(name, None, exc)

    return list(await asyncio.gather(*(check(name, pool) for name, pool in targets.items())))


def describe(checked: Checked) -> list[str]:
    """Lines for stdout: the session and what the relay offers."""
    info = checked.info
    if info is None:
        return [f"relay {checked.name}: no session (see below)"]
    name = checked.name if checked.name == info.relay else f"{checked.name} ({info.relay})"
    if info.tls == "none":
        tls = "no TLS (plain text)"
    else:
        tls = f"{info.tls}, {info.tls_version or 'TLS'}, certificate {info.certificate}"
    login = f"logged in as {info.login}" if info.login else "no login"
    if info.login and info.login_mechanism:
        login += f" with {info.login_mechanism}"
    offered = "AUTH " + " ".join(info.auth_methods) if info.auth_methods else "no AUTH"
    extensions = []
    for extension in EXTENSIONS:
        params = info.offers(extension)
        if params is not None:
            extensions.append(f"{extension} {params}".rstrip())
    missing = [extension for extension in EXTENSIONS if info.offers(extension) is None]
    return [
        f"relay {name}: session ok in {info.elapsed:.2f} s: {tls}; {login} ({offered})",
        "  offers: " + (", ".join(extensions) or "none of " + ", ".join(EXTENSIONS))
        + (f"; not {', '.join(missing)}" if missing and extensions else ""),
    ]
