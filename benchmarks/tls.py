"""Over TLS, where users send: SMTPPool, the minimal aiosmtplib pool and Nodemailer.

    ./dev python -m benchmarks.tls [--rounds 3] [--count 6000] [--sizes 4,16]

stunnel (implicit TLS, SMTPS) in front of Postfix's smtp-sink, with a certificate from
a throwaway CA (trustme) that every client trusts: nothing skips verification. Each
run is a fresh client process; rows are alternated round by round. Nodemailer runs
when ``node`` is installed and ``npm install --prefix benchmarks/node`` has been done,
twice: as shipped, and with TCP_NODELAY set on its sockets (Nodemailer leaves Nagle's
algorithm on and writes a message's ``.\r\n`` terminator as a record of its own, which
then waits for the relay's delayed ACK, ~40 ms on Linux: measured with strace, a 42 ms
gap between that write and the 250 on every message). stunnel is a third process on
the same cores: its CPU share is printed. On a machine with few cores the throughput
ratios are compressed by stunnel and the sink sharing the cores with the client; the
CPU per message of each client is the figure that does not depend on that.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import messages
from benchmarks.sinks import free_port, start_sink

ROOT = Path(__file__).resolve().parent.parent
NODE_DIR = Path(__file__).resolve().parent / "node"


def start_stunnel(target_port: int, workdir: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    """stunnel accepting SMTPS on a free port for ``target_port``: (process, port, CA file)."""
    import trustme

    binary = shutil.which("stunnel4") or shutil.which("stunnel")
    if binary is None:
        raise RuntimeError("stunnel is not installed (apt-get install stunnel4)")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(workdir / "server.pem"))
    ca.cert_pem.write_to_path(str(workdir / "ca.pem"))
    port = free_port()
    config = workdir / "stunnel.conf"
    # TCP_NODELAY both ways: a client that waits for each reply (Nodemailer, the minimal
    # pool) must not measure Nagle against delayed ACKs through the tunnel.
    config.write_text(f"foreground = yes\npid =\ndebug = 3\nsyslog = no\nsocket = l:TCP_NODELAY=1\n"
                      f"socket = r:TCP_NODELAY=1\n[smtps]\naccept = 127.0.0.1:{port}\n"
                      f"connect = 127.0.0.1:{target_port}\ncert = {workdir / 'server.pem'}\n")
    process = subprocess.Popen([binary, str(config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    import socket
    import ssl

    context = ssl.create_default_context(cafile=str(workdir / "ca.pem"))
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as raw_sock, \
                    context.wrap_socket(raw_sock, server_hostname="127.0.0.1") as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    break
        except OSError:
            pass
        if time.monotonic() > deadline or process.poll() is not None:
            process.kill()
            raise RuntimeError("stunnel did not start")
        time.sleep(0.05)
    return process, port, workdir / "ca.pem"


def _cpu_seconds(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return None


def run_row(impl: str, size: int, count: int, port: int, ca: Path, message: Path) -> dict[str, Any]:
    if impl.startswith("nodemailer"):
        command = ["node", str(NODE_DIR / "send.mjs"), "--port", str(port), "--count", str(count), "--size", str(size),
                   "--ca", str(ca), "--message", str(message), "--nodelay", "1" if impl.endswith("nodelay") else "0"]
    else:
        command = [sys.executable, "-m", "benchmarks.client", "--impl", impl, "--port", str(port), "--size",
                   str(size), "--count", str(count), "--tls-ca", str(ca)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            result: dict[str, Any] = json.loads(line[len("RESULT "):])
            return result
    return {"sent": 0, "failed": count, "error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tls", description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--count", type=int, default=6000, help="messages per run")
    parser.add_argument("--sizes", default="4,16", help="connections, comma-separated")
    parser.add_argument("--sink", default="smtp-sink", choices=["auto", "smtp-sink", "aiosmtpd"])
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    impls = ["pool", "minimal"]
    notes = []
    if shutil.which("node") and (NODE_DIR / "node_modules" / "nodemailer").is_dir():
        impls += ["nodemailer", "nodemailer-nodelay"]
    else:
        notes.append("Nodemailer not run: needs node and `npm install --prefix benchmarks/node`.")
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())
    measured: dict[tuple[str, int], list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tls-") as tmp:
        work = Path(tmp)
        raw, _ = messages.build()
        message = work / "message.eml"
        message.write_bytes(raw)
        sink = start_sink(args.sink, log=lambda *_: None)
        stunnel, port, ca = start_stunnel(sink.port, work)
        try:
            for index in range(args.rounds):
                for size in sizes:
                    for impl in impls if index % 2 == 0 else list(reversed(impls)):
                        before = _cpu_seconds(stunnel.pid)
                        # Nodemailer as shipped waits ~40 ms per message and connection (see
                        # above): a twelfth of the messages measures the same rate in bounded time.
                        count = max(200, args.count // 12) if impl == "nodemailer" else args.count
                        result = run_row(impl, size, count, port, ca, message)
                        after = _cpu_seconds(stunnel.pid)
                        if before is not None and after is not None and result.get("wall"):
                            result["stunnel_cpu"] = (after - before) / result["wall"]
                        measured.setdefault((impl, size), []).append(result)
                        rate = result["sent"] / result["wall"] if result.get("wall") else 0
                        print(f"round {index + 1}: {impl} K={size} {rate:,.0f} msg/s {result.get('error') or ''}",
                              file=sys.stderr)
        finally:
            stunnel.terminate()
            stunnel.wait(timeout=5)
            sink.stop()
    names = {"pool": "SMTPPool (pipelined)", "minimal": "minimal aiosmtplib pool", "nodemailer": "Nodemailer pool",
             "nodemailer-nodelay": "Nodemailer pool, TCP_NODELAY set"}
    print(f"{sink.description} behind stunnel (implicit TLS, certificate verified); {args.count:,} messages of "
          f"{len(raw):,} bytes a run (Nodemailer as shipped: {max(200, args.count // 12):,}), {args.rounds} rounds "
          f"alternated; load average before {load_before}, "
          f"after {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    print("| client | connections | msg/s (median) | min–max | CPU µs per message | stunnel CPU | SMTPPool ÷ this "
          "| this CPU ÷ SMTPPool's |")
    print("|---|---|---|---|---|---|---|---|")
    for size in sizes:
        pool_runs = [r for r in measured[("pool", size)] if r.get("wall") and not r.get("failed")]
        pool_rates = [r["sent"] / r["wall"] for r in pool_runs]
        pool_cpu = statistics.median(r["cpu"] / r["sent"] * 1e6 for r in pool_runs) if pool_runs else None
        for impl in impls:
            runs = [r for r in measured[(impl, size)] if r.get("wall") and not r.get("failed")]
            if not runs:
                error = measured[(impl, size)][0].get("error", "failed")
                print(f"| {names[impl]} | {size} | failed: {error[:120]} | | | | | |")
                continue
            rates = [r["sent"] / r["wall"] for r in runs]
            cpu = statistics.median(r["cpu"] / r["sent"] * 1e6 for r in runs)
            stunnel_cpu = [r["stunnel_cpu"] for r in runs if "stunnel_cpu" in r]
            ratio = (f"{statistics.median(pool_rates) / statistics.median(rates):.2f}×"
                     if pool_rates and impl != "pool" else "")
            cpu_ratio = f"{cpu / pool_cpu:.2f}×" if pool_cpu and impl != "pool" else ""
            print(f"| {names[impl]} | {size} | {statistics.median(rates):,.0f} | {min(rates):,.0f}–{max(rates):,.0f} "
                  f"| {cpu:.0f} | {f'{100 * statistics.median(stunnel_cpu):.0f}%' if stunnel_cpu else ''} | {ratio} "
                  f"| {cpu_ratio} |")
    for note in notes:
        print(f"\n{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
