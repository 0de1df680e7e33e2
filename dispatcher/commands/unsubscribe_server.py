"""``dispatcher unsubscribe-server``: serve one-click unsubscribes (RFC 8058) into the
suppression list."""

from __future__ import annotations

import argparse
import sys

from dispatcher.config import ConfigError, Settings, load_settings
from dispatcher.exit import ExitCode
from dispatcher.loop.suppression import StoreError, open_store


def main(args: argparse.Namespace) -> int:
    from dispatcher.loop.unsubscribe_server import UnsubscribeApp, listen, serve
    from dispatcher.observe.logs import configure_logging

    try:
        settings = load_settings(args.config) if args.config else Settings()
    except ConfigError as exc:
        print(f"dispatcher unsubscribe-server: config error: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    secret = settings.unsubscribe.secret
    if secret is None:
        print("dispatcher unsubscribe-server: unsubscribe.secret is not set (the key that signs {{ token }} in "
              "unsubscribe.url); set it in --config", file=sys.stderr)
        return ExitCode.USAGE
    configure_logging(settings.logging.level, settings.logging.format)
    host = args.host or settings.unsubscribe.server.host
    port = args.port if args.port is not None else settings.unsubscribe.server.port
    try:
        sock = listen(host, port)
    except OSError as exc:
        print(f"dispatcher unsubscribe-server: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        store = open_store(settings.suppression, settings.redis.url)
    except StoreError as exc:
        print(f"dispatcher unsubscribe-server: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    app = UnsubscribeApp(store, secret.get_secret_value())
    bound = sock.getsockname()[1]
    print(f"dispatcher unsubscribe-server: listening on http://{host}:{bound}/ (suppression list "
          f"{store.path})", file=sys.stderr, flush=True)
    try:
        import uvloop

        uvloop.run(serve(app, sock))
    except KeyboardInterrupt:
        return ExitCode.SIGNAL
    finally:
        store.close()
    return ExitCode.OK
