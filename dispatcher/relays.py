"""``relays:`` (docs/configuration.md): one ``SMTPPool`` per relay behind an ``SMTPRouter``.

The runner only needs what both a pool and a router offer (``Sender``): submit,
close, terminate, and the sizes that bound how many messages it keeps in flight.
"""

from __future__ import annotations

from collections.abc import Callable
from email.message import Message
from typing import Protocol

from prometheus_client import CollectorRegistry

from dispatcher.config import Settings
from pool import Envelope, SendResult, SMTPPool, SMTPRouter
from pool.ratelimit import SharedLimiter


class Sender(Protocol):
    """What ``dispatcher run`` submits through: an ``SMTPPool`` or a ``RelayRouter``."""

    @property
    def size(self) -> int: ...

    @property
    def queue_size(self) -> int: ...

    def queue_depth(self) -> int: ...

    async def connect(self) -> None: ...

    async def submit(
        self,
        message: Message | bytes | str | Envelope,
        *,
        sender: str | None = None,
        recipients: list[str] | tuple[str, ...] | None = None,
        prepared: bool = False,
        admit: Callable[[], bool] | None = None,
        envelope_id: str | None = None,
    ) -> SendResult: ...

    async def close(self, drain: bool = True) -> None: ...

    def terminate(self) -> None: ...


class RelayRouter(SMTPRouter):
    """An ``SMTPRouter`` that also reports the sizes of its pools, summed."""

    @property
    def size(self) -> int:
        return sum(pool.size for pool in self.pools.values())

    @property
    def queue_size(self) -> int:
        return sum(pool.queue_size for pool in self.pools.values())

    def queue_depth(self) -> int:
        return sum(pool.queue_depth() for pool in self.pools.values())


def build_router(settings: Settings, registry: CollectorRegistry | None, *,
                 rate_limiter: SharedLimiter | None = None) -> RelayRouter:
    """One pool per relay of ``settings.relays``, weighted; every ``smtp_pool_*``
    series goes to ``registry`` with a ``relay`` label (the pools register nothing).
    ``rate_limiter``, shared with other processes, paces every pool."""
    pools = {relay.name: SMTPPool.from_settings(relay, relay.pool, settings.retry, rate_limiter=rate_limiter)
             for relay in settings.relays or ()}
    weights = {relay.name: relay.weight for relay in settings.relays or ()}
    return RelayRouter(pools, weights, registry=registry)
