"""``dispatcher status``: what a Redis stream holds."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from dispatcher.commands.common import redis_command
from dispatcher.config import Settings
from dispatcher.exit import ExitCode


def main(args: argparse.Namespace) -> int:
    from dispatcher.stream.report import status as read_status

    async def body(redis: Any, keys: Any, settings: Settings, url: str) -> int:
        report = await read_status(redis, keys, settings.redis.group)
        if args.json:
            sys.stdout.write(json.dumps(report.as_dict()) + "\n")
        else:
            sys.stdout.write(report.render())
        return ExitCode.OK

    return redis_command("status", args, body)
