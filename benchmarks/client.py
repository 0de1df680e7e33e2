"""One measured run, in a fresh process: ``python -m benchmarks.client --impl pool ...``.

Prints one JSON object: messages sent and failed, wall seconds and this process's CPU
seconds (``time.process_time()``) from opening the pool to closing it. Imports and
message building are outside the measurement. The sink is another process.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from benchmarks.messages import SENDER, build

Submit = Callable[[], Awaitable[Any]]


async def _drive(submit: Submit, count: int, concurrency: int) -> tuple[int, int, str]:
    """``concurrency`` tasks call ``submit`` until ``count`` calls were made."""
    remaining = count
    sent = failed = 0
    first_error = ""

    async def worker() -> None:
        nonlocal remaining, sent, failed, first_error
        while remaining > 0:
            remaining -= 1
            try:
                await submit()
            except Exception as exc:  # noqa: BLE001 - counted and reported
                failed += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"
            else:
                sent += 1

    await asyncio.gather(*(worker() for _ in range(min(concurrency, count))))
    return sent, failed, first_error


async def _run(args: argparse.Namespace) -> dict[str, Any]:
    raw, to = build(args.message_size, args.recipients, args.attachment)
    host, port = "127.0.0.1", args.port
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if args.impl == "pool":
        from pool import SMTPPool

        options: dict[str, Any] = {"size": args.size, "max_attempts": 1}
        if args.tls_ca:
            options.update(use_tls=True, ca_file=args.tls_ca)
        if args.starttls_ca:
            options.update(start_tls=True, ca_file=args.starttls_ca)
        if args.pipeline_depth is not None:
            options["pipeline_depth"] = args.pipeline_depth
        if args.pipelining != "default":
            options["pipelining"] = None if args.pipelining == "on" else False
        async with SMTPPool(host, port, **options) as pool:
            sent, failed, error = await _drive(
                lambda: pool.submit(raw, sender=SENDER, recipients=to), args.count, args.concurrency)
    elif args.impl == "minimal":
        from benchmarks.minimal_pool import MinimalPool

        async with MinimalPool(host, port, args.size, tls_ca=args.tls_ca) as minimal:
            sent, failed, error = await _drive(lambda: minimal.submit(raw, SENDER, to), args.count, args.concurrency)
    elif args.impl == "naive":
        import aiosmtplib

        sent, failed, error = await _drive(
            lambda: aiosmtplib.send(raw, sender=SENDER, recipients=to, hostname=host, port=port, start_tls=False),
            args.count, args.concurrency)
    else:
        raise SystemExit(f"unknown --impl {args.impl}")
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {"sent": sent, "failed": failed, "error": error, "wall": wall, "cpu": cpu, "bytes": len(raw),
            "maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.client")
    parser.add_argument("--impl", choices=["pool", "minimal", "naive"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--size", type=int, default=4, help="connections (pool, minimal)")
    parser.add_argument("--concurrency", type=int, default=64, help="tasks submitting at once")
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--pipelining", choices=["on", "off", "default"], default="default")
    parser.add_argument("--message-size", type=int, default=2048)
    parser.add_argument("--recipients", type=int, default=1)
    parser.add_argument("--attachment", type=int, default=0, help="attachment bytes")
    parser.add_argument("--pipeline-depth", type=int, help="pool: transactions in flight with BDAT (1: DATA)")
    parser.add_argument("--tls-ca", help="implicit TLS (SMTPS), trusting this CA file (pool, minimal)")
    parser.add_argument("--starttls-ca", help="pool: STARTTLS required, trusting this CA file")
    args = parser.parse_args(argv)
    import structlog

    # The pool's log lines (one per connect) go to stderr; stdout is the result.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if args.loop == "uvloop":
        import uvloop

        outcome = uvloop.run(_run(args))
    else:
        outcome = asyncio.run(_run(args))
    print("RESULT " + json.dumps(outcome), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
