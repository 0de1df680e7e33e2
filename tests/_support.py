"""Helpers every kind of test shares: a free port on 127.0.0.1, and what a test does
when a real server or tool it needs is missing (skipped here, a failure under
``CI=true``, where .ci/run installs every one of them)."""

from __future__ import annotations

import os
import socket
from typing import NoReturn

import pytest


def free_port() -> int:
    """A port on 127.0.0.1 nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def missing(reason: str) -> NoReturn:
    """Skip the test because ``reason`` (a server or tool is not installed); under
    ``CI=true`` fail it instead, so that CI never passes by skipping the real thing."""
    __tracebackhide__ = True  # the skip or failure is reported at the test's line, not here
    if os.environ.get("CI") == "true":
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
