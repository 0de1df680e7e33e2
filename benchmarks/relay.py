"""A real relay: ``dispatcher run`` against a private Postfix smtpd, beside Postfix's own client.

    ./dev python -m benchmarks.relay [--rounds 3] [--jobs 5000] [--sizes 4]

One private Postfix (tests/postfixserver.py: its own master and queue, every message
handed to discard(8), so each is received by smtpd, written to the queue by cleanup,
scheduled by qmgr and logged like real mail; needs root) with STARTTLS offered on a
certificate from a throwaway CA (trustme) that the dispatcher verifies. Rows, each a
fresh process, alternated round by round on the same Postfix:

- ``smtp-source -d -s K``: Postfix's own C test client, K sessions, one message each
  transaction, plain text (smtp-source has no TLS): what this Postfix takes from a
  client that costs next to nothing;
- ``dispatcher run``, STARTTLS required (``smtp.start_tls: true``, ``ca_file``);
- ``dispatcher run``, plain text (``start_tls: false``): the same wire as smtp-source;
- the library (SMTPPool, raw messages, STARTTLS), to separate what composing costs.

Every row sends the same ~2 KB, one-recipient messages. The numbers say how close each
client gets to the relay's own limit (Postfix queues each message on disk: here the
relay, not the client, is usually the bottleneck).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import messages
from benchmarks.sinks import find_tool

ROOT = Path(__file__).resolve().parent.parent
ROWS = ("smtp-source", "dispatcher STARTTLS", "dispatcher plain", "SMTPPool STARTTLS")
NAMES = {"smtp-source": "Postfix smtp-source (plain text, no pipelining)",
         "dispatcher STARTTLS": "`dispatcher run`, STARTTLS",
         "dispatcher plain": "`dispatcher run`, plain text",
         "SMTPPool STARTTLS": "SMTPPool (library, raw messages), STARTTLS"}
_TLS_SESSION = re.compile(r"postfix/smtpd\[\d+\]: \S+ TLS connection established from")


def tls_main_cf(workdir: Path) -> dict[str, str]:
    """main.cf settings offering STARTTLS on a certificate from a throwaway CA; the CA
    file is ``workdir/ca.pem``."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost", "mta.test.example")
    cert.private_key_pem.write_to_path(str(workdir / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(workdir / "cert.pem"))
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    return {"smtpd_tls_security_level": "may", "smtpd_tls_cert_file": str(workdir / "cert.pem"),
            "smtpd_tls_key_file": str(workdir / "key.pem"), "smtpd_tls_loglevel": "1"}


def write_config(path: Path, port: int, size: int, ca: Path | None) -> Path:
    tls = ["  start_tls: true", f"  ca_file: {ca}"] if ca else ["  start_tls: false"]
    path.write_text("\n".join(["smtp:", "  hostname: 127.0.0.1", f"  port: {port}", *tls,
                               "pool:", f"  size: {size}"]) + "\n")
    return path


def run_row(row: str, size: int, count: int, port: int, work: Path) -> dict[str, Any]:
    from benchmarks.runner import Case, run_client, run_dispatcher, run_smtp_source

    if row == "smtp-source":
        return run_smtp_source(Case("relay", "smtp-source", size, count=count), port, work / "message.txt")
    if row == "SMTPPool STARTTLS":
        return run_client(Case("relay", "pool", size, count=count), port, extra=["--starttls-ca", str(work / "ca.pem")])
    ca = work / "ca.pem" if row == "dispatcher STARTTLS" else None
    config = write_config(work / f"{row.replace(' ', '-')}.yaml", port, size, ca)
    jobs = work / f"jobs-{count}.jsonl"
    if not jobs.exists():
        messages.write_jobs(jobs, count)
    return run_dispatcher(jobs, config, work / "results.jsonl", count, deadline=300)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.relay", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=5000, help="messages per run")
    parser.add_argument("--sizes", default="4", help="connections (smtp-source -s, pool.size), comma-separated")
    args = parser.parse_args(argv)
    if os.geteuid() != 0 or find_tool("postfix") is None or find_tool("smtp-source") is None:
        print("Not run: needs root and Postfix (apt-get install postfix: smtpd, smtp-source).")
        return 0
    sys.path.insert(0, str(ROOT / "tests"))
    from postfixserver import DISCARD_ALL, start_postfix

    sizes = [int(s) for s in args.sizes.split(",")]
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-relay-") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o755)
        raw, _ = messages.build()
        (work / "message.txt").write_bytes(raw.replace(b"\r\n", b"\n"))  # smtp-source adds the CRs
        postfix = start_postfix({**DISCARD_ALL, **tls_main_cf(work)}, master_cf=TLSMGR)
        try:
            started = time.perf_counter()
            for index in range(args.rounds):
                for size in sizes:
                    for row in ROWS if index % 2 == 0 else tuple(reversed(ROWS)):
                        result = run_row(row, size, args.jobs, postfix.port, work)
                        measured.setdefault((row, size), []).append(result)
                        rate = result["sent"] / result["wall"] if result.get("wall") else 0
                        print(f"round {index + 1}: {row} K={size} {rate:,.0f} msg/s {result.get('error') or ''}",
                              file=sys.stderr)
            took = time.perf_counter() - started
            expected = sum(r.get("sent", 0) for runs in measured.values() for r in runs)
            # discard(8) logs each message some time after smtpd took it
            deadline = time.monotonic() + 60
            while (discarded := sum(postfix.discarded().values())) < expected and time.monotonic() < deadline:
                time.sleep(0.2)
            tls_sessions = sum(1 for line in postfix.log().splitlines() if _TLS_SESSION.search(line))
        finally:
            postfix.stop()
    version = subprocess.run([find_tool("postconf") or "postconf", "-d", "-h", "mail_version"], capture_output=True,
                             text=True, check=False).stdout.strip()
    print(f"Postfix {version} smtpd (private master, discard(8) transport: every message queued on disk and "
          f"logged), STARTTLS offered with a private-CA certificate the dispatcher verifies; {args.jobs:,} "
          f"messages of ~{len(raw):,} bytes per run, {args.rounds} rounds alternated, {took:.0f} s; load average "
          f"before {load_before}, after {' '.join(f'{x:.2f}' for x in os.getloadavg())}. "
          f"discard(8) logged {discarded:,} of the {expected:,} messages the clients counted as sent; smtpd "
          f"logged {tls_sessions} TLS sessions.")
    print()
    print("| client | connections | msg/s (median) | min–max | CPU µs per message | ÷ smtp-source |")
    print("|---|---|---|---|---|---|")
    for size in sizes:
        base = [r["sent"] / r["wall"] for r in measured[("smtp-source", size)] if _ok(r)]
        for row in ROWS:
            runs = [r for r in measured[(row, size)] if _ok(r)]
            if not runs:
                error = str(measured[(row, size)][0].get("error") or "failed")
                print(f"| {NAMES[row]} | {size} | failed: {error[:120]} | | | |")
                continue
            rates = [r["sent"] / r["wall"] for r in runs]
            cpu = statistics.median(r["cpu"] / r["sent"] * 1e6 for r in runs)
            ratio = f"{statistics.median(rates) / statistics.median(base):.2f}×" if base and row != "smtp-source" else ""
            print(f"| {NAMES[row]} | {size} | {statistics.median(rates):,.0f} | {min(rates):,.0f}–{max(rates):,.0f} "
                  f"| {cpu:.0f} | {ratio} |")
    print()
    print("`dispatcher run` rows: wall time of the whole process (start-up included), CPU from `wait4`; the "
          "dispatcher uses BDAT (RFC 3030, `pool.pipeline_depth` 8) since Postfix offers CHUNKING. smtp-source "
          "sends one command at a time (no PIPELINING, no TLS).")
    return 0


#: tlsmgr(8): smtpd's TLS session cache and PRNG seed.
TLSMGR = "tlsmgr    unix  -       -       n       1000?   1       tlsmgr\n"


def _ok(result: dict[str, Any]) -> bool:
    return bool(result.get("wall")) and result.get("sent", 0) > 0 and not result.get("failed") \
        and not result.get("error")


if __name__ == "__main__":
    sys.exit(main())
