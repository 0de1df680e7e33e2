"""``dispatcher check-config``: validate a configuration file; ``--connect`` opens one
session with each relay."""

from __future__ import annotations

import argparse
import sys

from dispatcher.commands.common import event_loop_runner
from dispatcher.config import ConfigError, Settings, load_settings
from dispatcher.exit import ExitCode
from dispatcher.observe.logs import configure_logging


def main(args: argparse.Namespace) -> int:
    try:
        settings = load_settings(args.file)
    except ConfigError as exc:
        print(f"{exc}", file=sys.stderr)
        return ExitCode.USAGE
    try:
        campaign = campaign_lines(settings)  # reads the DKIM key, compiles the unsubscribe templates
    except ValueError as exc:
        print(f"{args.file}: {exc}", file=sys.stderr)
        return ExitCode.USAGE
    if settings.relays:
        print(f"{args.file}: ok ({len(settings.relays)} relays)")
        for r in settings.relays:
            print(f"  relay {r.name}: {r.hostname}:{r.port}, weight {r.weight:g}, pool size {r.pool.size}"
                  + (f", rate limit {r.pool.rate_limit:g}/s" if r.pool.rate_limit else ""))
    else:
        relay = f"{settings.smtp.hostname}:{settings.smtp.port}" if settings.smtp else "none (built-in capture server)"
        print(f"{args.file}: ok (relay {relay}, pool size {settings.pool.size})")
    for line in campaign:
        print(f"  {line}")
    return _connect(settings) if args.connect else ExitCode.OK


def _connect(settings: Settings) -> int:
    # The session's info lines (smtp.connect) would repeat what is printed; warnings stay.
    level = settings.logging.level if settings.logging.level in ("debug", "error") else "warning"
    configure_logging(level, settings.logging.format)
    return event_loop_runner()(_connect_relays(settings))


async def _connect_relays(settings: Settings) -> int:
    """``check-config --connect``: 0 when every relay accepts the session, else 2 with
    each relay's reason on stderr, worded as ``run`` would stop with it."""
    from dispatcher.relay_check import check_relays, describe

    checked = await check_relays(settings)
    if not checked:
        print("  connect: no relay configured; run delivers to the built-in capture server")
        return ExitCode.OK
    for relay in checked:
        for line in describe(relay):
            print(f"  {line}")
    failed = [relay.error for relay in checked if relay.error is not None]
    print("  nothing was sent" + ("" if not failed else f"; {len(failed)} of {len(checked)} relays refused"))
    for error in failed:
        print(f"dispatcher: {error}", file=sys.stderr)
    return ExitCode.USAGE if failed else ExitCode.OK


def campaign_lines(settings: Settings) -> list[str]:
    """What check-config says of templates, unsubscribe and dkim (docs/campaigns.md), when
    set; with DKIM, the TXT record to publish. Raises ValueError (one line)."""
    from dispatcher.compose.templates import Unsubscribe

    lines = []
    if "templates" in settings.model_fields_set:
        where = settings.templates.dir
        lines.append(f"templates: {where}/" + ("" if where.is_dir() else " (no such directory yet)"))
    unsubscribe = settings.unsubscribe
    if Unsubscribe.from_settings(unsubscribe) is not None:
        given = [value for value in (unsubscribe.url, unsubscribe.mailto) if value]
        one_click = bool(unsubscribe.url and unsubscribe.url.lower().startswith("https://"))
        lines.append("unsubscribe: " + ", ".join(given) + (" (one-click, RFC 8058)" if one_click else ""))
    from pool.dkim import signers_from_settings

    signers = signers_from_settings(settings.dkim)
    for signer in signers:
        lines.append(f"dkim: {signer.algorithm} for {signer.domain}; publish this TXT record at {signer.dns_name}:")
        lines.append(f"  {signer.dns_txt()}")
    if signers and settings.jobs.default_from:
        from dispatcher.compose.address import parse_mailbox

        try:
            domain = parse_mailbox(settings.jobs.default_from).address.rpartition("@")[2]
        except ValueError as exc:
            raise ValueError(f"jobs.default_from: {exc}") from None
        if not any(signer.aligned(domain) for signer in signers):
            keys = ", ".join(sorted({signer.domain for signer in signers}))
            lines.append(f"warning: jobs.default_from is in {domain}, not in the DKIM domain {keys} or below it: "
                         "DMARC (RFC 7489) fails unless SPF aligns; sign with a key of the From domain")
    return lines
