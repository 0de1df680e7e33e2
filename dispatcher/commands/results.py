"""``dispatcher results``: the results of a Redis stream on stdout, in the results file format."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dispatcher.commands.common import redis_command
from dispatcher.config import Settings
from dispatcher.exit import ExitCode


def main(args: argparse.Namespace) -> int:
    from dispatcher.stream.report import write_results

    async def body(redis: Any, keys: Any, settings: Settings, url: str) -> int:
        try:
            await write_results(redis, keys, sys.stdout.buffer)
            sys.stdout.flush()
        except BrokenPipeError:
            return ExitCode.OK  # `dispatcher results | head`
        return ExitCode.OK

    return redis_command("results", args, body)
