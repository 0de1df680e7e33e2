"""Prometheus metrics of one pool, registered on the registry it was given.

The hot path only adds to plain ints; a custom collector turns them into the families
of docs/metrics.md when scraped. prometheus_client's Counter and Histogram take a lock
per update: about 5 us of the ~50 us a pipelined message costs (profiled).
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

SEND_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TRANSACTION_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class PoolMetrics(Collector):
    """Counters of one pool. With no registry, they live in a private one."""

    def __init__(
        self,
        registry: CollectorRegistry | None,
        *,
        queue_depth: Callable[[], float],
        connections_open: Callable[[], float],
        rate_current: Callable[[], float] = lambda: float("inf"),
        relay_up: Callable[[], float] = lambda: 1.0,
    ) -> None:
        self.sent = 0
        self.failed = 0
        self.retries = 0
        self.ambiguous = 0
        self.connects = 0
        self.connect_errors = 0
        self._buckets = [0] * (len(SEND_SECONDS_BUCKETS) + 1)  # the last one is +Inf
        self._seconds = 0.0
        self._tx_buckets = [0] * (len(TRANSACTION_SECONDS_BUCKETS) + 1)
        self._tx_seconds = 0.0
        self.replies: dict[int, int] = {}  # final replies by code; codes are 3 digits, so bounded
        self._rate_current = rate_current
        self._relay_up = relay_up
        self._queue_depth = queue_depth
        self._connections_open = connections_open
        self.registry = registry if registry is not None else CollectorRegistry()
        self.registry.register(self)

    def observe_send(self, seconds: float) -> None:
        """One message reached its outcome ``seconds`` after it was submitted."""
        self._buckets[bisect_left(SEND_SECONDS_BUCKETS, seconds)] += 1
        self._seconds += seconds

    def observe_transaction(self, seconds: float) -> None:
        """One transaction's wire time, without the queue wait."""
        self._tx_buckets[bisect_left(TRANSACTION_SECONDS_BUCKETS, seconds)] += 1
        self._tx_seconds += seconds

    def reply(self, code: int) -> None:
        if 100 <= code <= 599:  # anything else is no SMTP reply: keep the label set bounded
            self.replies[code] = self.replies.get(code, 0) + 1

    def describe(self) -> Iterator[Metric]:
        return self._families(empty=True)

    def collect(self) -> Iterator[Metric]:
        return self._families(empty=False)

    def _families(self, *, empty: bool) -> Iterator[Metric]:
        def counter(name: str, documentation: str, value: int) -> CounterMetricFamily:
            return CounterMetricFamily(name, documentation, value=None if empty else value)

        messages = CounterMetricFamily("smtp_pool_messages", "Messages that reached an outcome.", labels=["outcome"])
        if not empty:
            messages.add_metric(["sent"], self.sent)
            messages.add_metric(["failed"], self.failed)
        yield messages
        yield counter("smtp_pool_retries", "Transaction attempts that were retried.", self.retries)
        yield counter("smtp_pool_ambiguous",
                      "Connections lost after end-of-DATA was sent and before its reply.", self.ambiguous)
        yield counter("smtp_pool_connects", "SMTP sessions opened.", self.connects)
        yield counter("smtp_pool_connect_errors", "Failed attempts to open an SMTP session.", self.connect_errors)
        yield _histogram("smtp_pool_send_seconds", "Seconds from submit to result.",
                         SEND_SECONDS_BUCKETS, self._buckets, self._seconds, empty)
        yield _histogram("smtp_pool_transaction_seconds",
                         "Seconds one SMTP transaction took on the wire, without the queue wait.",
                         TRANSACTION_SECONDS_BUCKETS, self._tx_buckets, self._tx_seconds, empty)
        replies = CounterMetricFamily("smtp_pool_replies", "Final replies to a message or recipient, by code.",
                                      labels=["code"])
        if not empty:
            for code, count in sorted(self.replies.items()):
                replies.add_metric([str(code)], count)
        yield replies
        yield GaugeMetricFamily("smtp_pool_rate_current",
                                "Messages per second the pool allows itself now (+Inf: unlimited).",
                                value=None if empty else self._rate_current())
        yield GaugeMetricFamily("smtp_pool_relay_up", "1 while the relay can be reached and accepts the session.",
                                value=None if empty else self._relay_up())
        yield GaugeMetricFamily("smtp_pool_connections_open", "SMTP sessions open now.",
                                value=None if empty else self._connections_open())
        yield GaugeMetricFamily("smtp_pool_queue_depth", "Messages waiting in the pool's queue.",
                                value=None if empty else self._queue_depth())


def _histogram(
    name: str, documentation: str, bounds: tuple[float, ...], counts: list[int], total: float, empty: bool
) -> HistogramMetricFamily:
    histogram = HistogramMetricFamily(name, documentation)
    if not empty:
        cumulative, buckets = 0, []
        for bound, count in zip((*bounds, float("inf")), counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == float("inf") else repr(float(bound)), cumulative))
        histogram.add_metric([], buckets, sum_value=total)
    return histogram
