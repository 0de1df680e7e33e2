"""One module per ``dispatcher`` subcommand, each with ``main(args) -> exit status``
(``dispatcher.cli`` parses the arguments). A command's module is imported only
when it runs: ``run`` never imports Redis, ``status`` never imports the pool."""

from __future__ import annotations

import argparse
import importlib

MODULES = {
    "run": "run", "sink": "sink", "check-config": "check_config",
    "enqueue": "enqueue", "worker": "worker", "status": "status", "results": "results", "requeue": "requeue",
    "suppress": "suppress", "bounces": "bounces", "unsubscribe-server": "unsubscribe_server",
}


def run(command: str, args: argparse.Namespace) -> int:
    """Run ``command``'s ``main``; returns its exit status."""
    module = importlib.import_module(f"dispatcher.commands.{MODULES[command]}")
    status: int = module.main(args)
    return status
