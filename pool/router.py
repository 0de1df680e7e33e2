"""SMTPRouter: several relays behind one ``submit`` (docs/library.md, "Several relays").

Messages are spread by weight (smooth weighted round robin, as nginx does for its
upstreams: deterministic, and no relay waits long for its turn). A relay whose pool is
in RelayError is skipped: for good when the failure is permanent, until its pool's
probe opens a session again when it is transient; a message that met the RelayError
goes to the next relay. DeliveryError (the relay refused the message or its
recipients) is final and never re-sent elsewhere.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator, Mapping
from email.message import Message
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.registry import Collector

from pool.envelope import Envelope, for_recipients
from pool.errors import DeliveryError, Refusals, RelayError
from pool.pool import SMTPPool
from pool.results import SendResult


class SMTPRouter:
    """Route each message to one of several named ``SMTPPool``s.

    ``weights`` (default 1 each) spread the messages; ``registry``, when given,
    receives every pool's ``smtp_pool_*`` series with a ``relay`` label (create the
    pools without a registry of their own).
    """

    def __init__(
        self,
        pools: Mapping[str, SMTPPool],
        weights: Mapping[str, float] | None = None,
        *,
        registry: CollectorRegistry | None = None,
    ) -> None:
        if not pools:
            raise ValueError("pools: at least one relay is needed")
        self.pools = dict(pools)
        self.weights = {name: float((weights or {}).get(name, 1)) for name in self.pools}
        unknown = set(weights or {}) - set(self.pools)
        if unknown:
            raise ValueError(f"weights: no relay named {sorted(unknown)[0]!r}")
        if any(weight <= 0 for weight in self.weights.values()):
            raise ValueError("weights: every weight must be positive")
        self._credit = dict.fromkeys(self.pools, 0.0)
        if registry is not None:
            registry.register(_RelayMetrics(self.pools))

    def __repr__(self) -> str:
        up = [name for name, pool in self.pools.items() if pool.relay_error is None]
        return f"<SMTPRouter relays={list(self.pools)} up={up}>"

    async def __aenter__(self) -> SMTPRouter:
        for pool in self.pools.values():
            await pool.__aenter__()
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        await self.close(drain=exc_type is not asyncio.CancelledError)

    async def close(self, drain: bool = True) -> None:
        await asyncio.gather(*(pool.close(drain=drain) for pool in self.pools.values()))

    def terminate(self) -> None:
        for pool in self.pools.values():
            pool.terminate()

    def _pick(self, exclude: set[str]) -> str | None:
        """Smooth weighted round robin over the relays that are up and not excluded."""
        candidates = [name for name, pool in self.pools.items()
                      if name not in exclude and pool.relay_error is None]
        if not candidates:
            return None
        total = sum(self.weights[name] for name in candidates)
        for name in candidates:
            self._credit[name] += self.weights[name]
        best = max(candidates, key=self._credit.__getitem__)
        self._credit[best] -= total
        return best

    async def connect(self) -> None:
        """A session on one relay at least, before any message: returns once a relay
        has one (the others are left to connect when they are needed). Raises the
        RelayError of the relay that failed first when none can: a transient one when
        any relay stayed down, else a refusal."""
        pending = {asyncio.ensure_future(pool.connect()) for pool in self.pools.values()}
        errors: list[RelayError] = []
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    error = task.exception()
                    if error is None:
                        return
                    if not isinstance(error, RelayError):
                        raise error
                    errors.append(error)
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
        raise next((e for e in errors if e.transient), errors[0])

    async def submit(
        self,
        message: Message | bytes | str | Envelope,
        *,
        sender: str | None = None,
        recipients: list[str] | tuple[str, ...] | None = None,
        relay: str | None = None,
        prepared: bool = False,
        admit: Callable[[], bool] | None = None,
        envelope_id: str | None = None,
    ) -> SendResult:
        """Send through one relay (``relay`` pins one); same results and errors as
        ``SMTPPool.submit``, plus ``SendResult.relay``. RelayError only when every
        relay is failing (the last one met)."""
        if relay is not None:
            if relay not in self.pools:
                raise ValueError(f"relay: no relay named {relay!r}")
            try:
                result = await self.pools[relay].submit(message, sender=sender, recipients=recipients,
                                                        prepared=prepared, admit=admit, envelope_id=envelope_id)
            except DeliveryError as exc:
                raise exc.through(relay) from None
            return dataclasses.replace(result, relay=relay)
        started = time.monotonic()
        tried: set[str] = set()
        last: RelayError | None = None
        earlier: Refusals = {}  # permanent refusals met on a relay that then failed
        while (name := self._pick(tried)) is not None:
            tried.add(name)
            try:
                result = await self.pools[name].submit(message, sender=sender, recipients=recipients,
                                                       prepared=prepared, admit=admit, envelope_id=envelope_id)
            except RelayError as exc:
                # Not delivered through this relay (or, if maybe_delivered, perhaps: the
                # next relay makes it at-least-once). A recipient it refused for good is
                # never sent elsewhere.
                last = exc
                if exc.refused:
                    earlier.update(exc.refused)
                    if isinstance(message, Envelope):
                        message = for_recipients(message, exc.recipients)
                    else:
                        recipients = list(exc.recipients)
                continue
            except DeliveryError as exc:
                raise exc.through(name, earlier) from None  # refused by this relay: final, never re-sent elsewhere
            if earlier:
                result = dataclasses.replace(result, refused={**earlier, **result.refused})
            # From this submit, through every relay tried (as documented: submit to result).
            return dataclasses.replace(result, relay=name, elapsed=time.monotonic() - started)
        if last is not None:
            raise last
        errors = [pool.relay_error for pool in self.pools.values() if pool.relay_error is not None]
        transient = [e for e in errors if e.transient]
        raise (transient or errors)[0] if errors else RelayError(
            "no relay available", transient=True, relay=",".join(self.pools))


class _RelayMetrics(Collector):
    """Every pool's families, merged, each sample labelled with its relay's name."""

    def __init__(self, pools: Mapping[str, SMTPPool]) -> None:
        self._pools = pools

    def describe(self) -> Iterator[Metric]:
        return iter(())  # series appear at the first scrape

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for name, pool in self._pools.items():
            for family in pool.metrics.collect():
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    target.samples.append(sample._replace(labels={**sample.labels, "relay": name}))
        return iter(merged.values())
