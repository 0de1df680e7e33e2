"""``dispatcher requeue``: dead-lettered (or invalid) jobs back on a Redis stream."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from dispatcher.commands.common import redis_command
from dispatcher.config import Settings
from dispatcher.exit import ExitCode


def main(args: argparse.Namespace) -> int:
    from dispatcher.stream.requeue import requeue as move

    ids: set[str] | None = None
    if args.ids is not None:
        try:
            ids = {line.strip() for line in args.ids.read_text(encoding="utf-8").splitlines() if line.strip()}
        except (OSError, UnicodeDecodeError) as exc:
            print(f"dispatcher requeue: --ids {args.ids}: {getattr(exc, 'strerror', None) or exc}", file=sys.stderr)
            return ExitCode.USAGE

    async def body(redis: Any, keys: Any, settings: Settings, url: str) -> int:
        counts = await move(redis, keys, settings.redis.group, dead=args.dead or not args.invalid,
                            invalid=args.invalid, ids=ids)
        text = (f"dispatcher requeue: {counts.dead + counts.invalid} jobs back on {keys.stream} ({counts.dead} dead, "
                f"{counts.invalid} invalid)")
        if counts.forgotten:
            text += f"; {counts.forgotten} ids invalid at enqueue forgotten: enqueue the fixed file again to add them"
        print(text, file=sys.stderr)
        return ExitCode.OK

    return redis_command("requeue", args, body)
