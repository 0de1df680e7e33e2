"""The exit status of every ``dispatcher`` command, in one place."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0  # every job sent (or, for a read-only command, it did what was asked)
    FAILED = 1  # some job failed or was invalid
    # A usage or configuration error, a permanent session failure, a Redis error; also an
    # error of the environment (results file unwritable, jobs unreadable) or a bug: fix
    # the cause and run the same command.
    USAGE = 2
    RELAY_DOWN = 3  # the relay was unreachable for relay_down_timeout: run the same command later
    SIGNAL = 130  # stopped by SIGINT or SIGTERM
