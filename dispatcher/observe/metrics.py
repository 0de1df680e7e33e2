"""The batch command's metrics (docs/metrics.md): ``dispatcher_*`` families, the
``/metrics`` server and the textfile written at the end.

The families are read from the run's counters when scraped, as the pool does
(``pool/metrics.py``): the hot path adds to plain ints, never takes a lock.
"""

from __future__ import annotations

import errno
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from prometheus_client import CollectorRegistry, start_http_server, write_to_textfile
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

STATUSES = ("sent", "failed", "invalid", "suppressed", "skipped")


class Counts(Protocol):
    """What the run counts (``dispatcher.batch.runner.Tally``)."""

    @property
    def counts(self) -> Mapping[str, int]: ...
    @property
    def jobs_read(self) -> int: ...
    @property
    def bytes_read(self) -> int: ...
    @property
    def bytes_done(self) -> int: ...
    @property
    def bytes_total(self) -> int | None: ...
    @property
    def finished(self) -> float | None: ...


class MetricsError(Exception):
    """The metrics server cannot start: one line for the user."""


class RunMetrics(Collector):
    """``dispatcher_jobs_total{status}``, ``dispatcher_jobs_read_total``,
    ``dispatcher_input_bytes_read``, ``dispatcher_input_bytes_done``,
    ``dispatcher_input_bytes_total`` and ``dispatcher_run_finished_timestamp_seconds``
    of one run.

    ``dispatcher_input_bytes_total`` is the jobs file's size; it is left out when
    the size is unknown (standard input, a pipe), so that no progress is made up."""

    def __init__(self, counts: Counts, registry: CollectorRegistry) -> None:
        self._counts = counts
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        return self._families(empty=True)

    def collect(self) -> Iterator[Metric]:
        return self._families(empty=False)

    def _families(self, *, empty: bool) -> Iterator[Metric]:
        c = self._counts
        jobs = CounterMetricFamily("dispatcher_jobs", "Jobs of this run by outcome.", labels=["status"])
        if not empty:
            for status in STATUSES:
                jobs.add_metric([status], c.counts.get(status, 0))
        yield jobs
        yield CounterMetricFamily("dispatcher_jobs_read", "Lines of the jobs file read so far (blank ones too).",
                                  value=None if empty else c.jobs_read)
        yield GaugeMetricFamily("dispatcher_input_bytes_read", "Bytes of the jobs file read so far.",
                                value=None if empty else c.bytes_read)
        # Read runs ahead of done by what the pool holds (and what a compose process has
        # read ahead): progress and an ETA are truest on the bytes of the jobs ended.
        yield GaugeMetricFamily("dispatcher_input_bytes_done", "Bytes of the jobs file whose jobs have ended.",
                                value=None if empty else c.bytes_done)
        total = GaugeMetricFamily("dispatcher_input_bytes_total",
                                  "Size of the jobs file in bytes (absent when unknown: standard input, a pipe).")
        if not empty and c.bytes_total is not None:
            total.add_metric([], c.bytes_total)
        yield total
        # In the textfile only: what tells an alert rule that this run has ended (its
        # relay_up 0 and its flat job counts are history, not an outage or a stall).
        finished = GaugeMetricFamily("dispatcher_run_finished_timestamp_seconds",
                                     "When the run ended (Unix time); absent while it runs.")
        if not empty and c.finished is not None:
            finished.add_metric([], c.finished)
        yield finished


@dataclass
class MetricsServer:
    """The ``/metrics`` endpoint, served from a thread of its own while the run lasts."""

    address: str
    port: int  # the port bound (differs from the one asked for when that was 0)
    _server: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{_hostport(self.address, self.port)}/metrics"

    def stop(self) -> None:
        shutdown = getattr(self._server, "shutdown", None)
        if shutdown is not None:
            shutdown()
        close = getattr(self._server, "server_close", None)
        if close is not None:
            close()
        self._thread.join(timeout=5)


def serve(address: str, port: int, registry: CollectorRegistry) -> MetricsServer:
    """Serve ``registry`` at ``http://address:port/metrics``.

    Raises MetricsError naming ``address:port`` when it cannot (the port is taken,
    the address is not one of this host's)."""
    where = _hostport(address, port)
    try:
        server, thread = start_http_server(port, addr=address, registry=registry)
    except socket.gaierror as exc:
        raise MetricsError(f"cannot serve metrics on {where}: unknown address {address!r} ({exc.strerror})") from None
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            raise MetricsError(f"cannot serve metrics on {where}: port {port} is already in use "
                               "(choose another with --metrics-port or metrics.port)") from None
        if exc.errno == errno.EADDRNOTAVAIL:
            raise MetricsError(f"cannot serve metrics on {where}: {address} is not an address of this host "
                               "(metrics.address or --metrics-address)") from None
        raise MetricsError(f"cannot serve metrics on {where}: {exc.strerror or exc}") from None
    bound = server.socket.getsockname()[1] if hasattr(server, "socket") else port
    return MetricsServer(address, int(bound), server, thread)


def write_textfile(path: Path, registry: CollectorRegistry) -> str | None:
    """Write ``registry`` to ``path`` atomically (node_exporter's textfile format).

    Returns None, or one line saying why it could not be written."""
    try:
        write_to_textfile(str(path), registry)
    except OSError as exc:
        return f"cannot write the metrics textfile {path}: {exc.strerror or exc}"
    return None


def _hostport(address: str, port: int) -> str:
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
