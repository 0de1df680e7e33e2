"""``dispatcher worker``: send the jobs of a Redis stream, in its consumer group."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dispatcher.commands.common import redis_command, tune_gc
from dispatcher.config import Settings


def main(args: argparse.Namespace) -> int:
    from dispatcher.stream.worker import (
        Worker,
        WorkerOptions,
        default_claim_after,
        default_consumer,
    )

    async def body(redis: Any, keys: Any, settings: Settings, url: str) -> int:
        if args.metrics_port is not None:
            settings = settings.model_copy(update={"metrics": settings.metrics.model_copy(
                update={"port": args.metrics_port})})
        root = args.attachments_root or getattr(getattr(settings, "jobs", None), "attachments_root", None) or Path.cwd()
        options = WorkerOptions(
            url=url,
            consumer=args.name or default_consumer(),
            group=settings.redis.group,
            claim_after=settings.redis.claim_after or default_claim_after(settings),
            max_deliveries=settings.redis.max_deliveries,
            attachments_root=Path(root),
            maildir=args.maildir,
            until_empty=args.until_empty,
        )
        return await Worker(redis, keys, settings, options).execute()

    tune_gc()  # as run does: the jobs in flight are not traversed again and again
    return redis_command("worker", args, body)
