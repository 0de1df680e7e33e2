"""What ``run`` and ``worker`` send through, built one way for both: ``build_sender``.

- ``smtp:``   one ``SMTPPool``;
- ``relays:`` one pool per relay behind a weighted router (``dispatcher.relays``);
- neither:    one pool to the built-in capture server (a Maildir), said on stderr.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from dispatcher.config import ConfigError, Settings
from dispatcher.relays import Sender, build_router
from dispatcher.sink import CaptureServer
from pool import SMTPPool
from pool.config import SMTPSettings
from pool.ratelimit import SharedLimiter


@dataclass
class Sending:
    """A built sender, where it sends (for the start log line), and the capture server
    it sends to when no relay is configured (``close()`` stops it)."""

    sender: Sender
    where: dict[str, Any]
    sink: CaptureServer | None = None

    async def close(self) -> None:
        """Stop the capture server, if any (the sender is closed by its user, who
        decides between draining and terminating)."""
        if self.sink is not None:
            await self.sink.stop()


async def build_sender(settings: Settings, registry: CollectorRegistry, *, maildir: Path, command: str,
                       rate_limiter: SharedLimiter | None = None) -> Sending:
    """The pool, router or capture server ``settings`` ask for; every ``smtp_pool_*``
    series goes to ``registry`` (with a ``relay`` label under ``relays:``).

    ``rate_limiter``: a limiter shared with other processes (the Redis workers' bucket)
    that replaces ``pool.rate_limit``; a relay's own ``pool.rate_limit`` still applies."""
    sink: CaptureServer | None = None
    if settings.smtp is None and not settings.relays:
        sink = await CaptureServer(maildir=maildir).start()
        print(f"{command}: no relay configured (no smtp: section); delivering to the built-in capture server "
              f"on 127.0.0.1:{sink.port}, Maildir {maildir}/", file=sys.stderr)
        local = SMTPSettings.model_validate({"hostname": "127.0.0.1", "port": sink.port})
        settings = settings.model_copy(update={"smtp": local})
    if settings.relays:
        router = build_router(settings, registry, rate_limiter=rate_limiter)
        return Sending(router, {"relays": {r.name: f"{r.hostname}:{r.port}" for r in settings.relays}}, sink)
    smtp = settings.smtp
    if smtp is None:
        raise ConfigError("smtp: no relay configured")
    # A shared limiter replaces the pool's own rate_limit.
    paced = settings.pool if rate_limiter is None else settings.pool.model_copy(update={"rate_limit": None})
    pool = SMTPPool.from_settings(smtp, paced, settings.retry, registry=registry, rate_limiter=rate_limiter)
    return Sending(pool, {"host": smtp.hostname, "port": smtp.port}, sink)
