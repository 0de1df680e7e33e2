"""Prometheus collectors of one pool, registered on the registry it was given."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

SEND_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class PoolMetrics:
    """SPEC section 4 collectors. With no registry, they live in a private one."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        *,
        queue_depth: Callable[[], float],
        connections_open: Callable[[], float],
    ) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = self.registry
        messages = Counter(
            "smtp_pool_messages", "Messages that reached an outcome.", ["outcome"], registry=reg
        )
        self.sent = messages.labels(outcome="sent")
        self.failed = messages.labels(outcome="failed")
        self.retries = Counter(
            "smtp_pool_retries", "Transaction attempts that were retried.", registry=reg
        )
        self.ambiguous = Counter(
            "smtp_pool_ambiguous",
            "Connections lost after end-of-DATA was sent and before its reply.",
            registry=reg,
        )
        self.send_seconds = Histogram(
            "smtp_pool_send_seconds",
            "Seconds from submit to result.",
            buckets=SEND_SECONDS_BUCKETS,
            registry=reg,
        )
        self.connects = Counter("smtp_pool_connects", "SMTP sessions opened.", registry=reg)
        self.connect_errors = Counter(
            "smtp_pool_connect_errors", "Failed attempts to open an SMTP session.", registry=reg
        )
        Gauge(
            "smtp_pool_connections_open", "SMTP sessions open now.", registry=reg
        ).set_function(connections_open)
        Gauge(
            "smtp_pool_queue_depth", "Messages waiting in the pool's queue.", registry=reg
        ).set_function(queue_depth)
