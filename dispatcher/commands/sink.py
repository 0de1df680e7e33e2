"""``dispatcher sink``: the local capture server (aiosmtpd -> Maildir)."""

from __future__ import annotations

import argparse
import asyncio
import sys

from dispatcher.commands.common import event_loop_runner
from dispatcher.exit import ExitCode
from dispatcher.observe.logs import configure_logging


def main(args: argparse.Namespace) -> int:
    from dispatcher.sink import CaptureServer

    configure_logging("info", "auto")

    async def serve() -> int:
        import signal

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signum, stop.set)
        async with CaptureServer(args.host, args.port, args.maildir) as server:
            print(f"dispatcher sink: listening on {server.host}:{server.port}, Maildir {server.maildir}/",
                  file=sys.stderr, flush=True)
            await stop.wait()
            print(f"dispatcher sink: stopped after {server.handler.received} messages", file=sys.stderr)
        return ExitCode.OK

    try:
        return event_loop_runner()(serve())
    except OSError as exc:
        print(f"dispatcher sink: {exc}", file=sys.stderr)
        return ExitCode.USAGE
