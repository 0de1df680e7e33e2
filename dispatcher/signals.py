"""SIGINT and SIGTERM handled in the event loop, for `run` and `worker` alike."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager


@contextmanager
def signal_handlers(callback: Callable[[int], None]) -> Iterator[None]:
    """Call ``callback(signum)`` on SIGINT and SIGTERM while the block runs (where the
    loop supports it), and restore the previous handling after it."""
    loop = asyncio.get_running_loop()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, callback, signum)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):
            pass
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
