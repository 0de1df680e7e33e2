"""The exit status of every ``dispatcher`` command, in one place."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # every job sent (or, for a read-only command, it did what was asked)
    FAILED = 1  # some job failed or was invalid
    USAGE = 2  # a usage or configuration error, a permanent session failure, a Redis error
    RELAY_DOWN = 3  # the relay was unreachable for relay_down_timeout: run the same command later
    SIGNAL = 130  # stopped by SIGINT or SIGTERM
