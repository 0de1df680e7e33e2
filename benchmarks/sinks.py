"""The SMTP server the benchmarks send to, always in a process of its own.

Postfix's ``smtp-sink`` (C, event-driven, advertises PIPELINING, throws mail away) is
preferred; it is found on PATH or in /usr/sbin, or installed with ``--install-sink``
(apt-get, root only, with a policy-rc.d that keeps the Postfix daemon from starting).
Without it, an aiosmtpd sink runs in a subprocess: ``python -m benchmarks.sinks PORT``.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_SBIN = ("/usr/sbin", "/usr/local/sbin", "/usr/lib/postfix/sbin")


def find_tool(name: str) -> str | None:
    """Path of a Postfix test program (smtp-sink, smtp-source), or None."""
    found = shutil.which(name)
    if found:
        return found
    for directory in _SBIN:
        candidate = Path(directory) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def install_postfix(log: callable = print) -> bool:  # type: ignore[valid-type]
    """apt-get install postfix without ever starting its daemon. True when smtp-sink exists after."""
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        log("cannot install postfix: needs root and apt-get")
        return False
    policy = Path("/usr/sbin/policy-rc.d")
    placed = False
    try:
        if not policy.exists():
            # Debian's invoke-rc.d asks this script first; 101 = "action forbidden".
            policy.write_text("#!/bin/sh\nexit 101\n")
            policy.chmod(0o755)
            placed = True
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", "postfix"]):
            log("running: " + " ".join(command))
            done = subprocess.run(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600)
            if done.returncode != 0:
                log(f"{command[1]} failed: {done.stderr.strip()[-500:]}")
                return False
    except (OSError, subprocess.SubprocessError) as exc:
        log(f"installing postfix failed: {exc}")
        return False
    finally:
        if placed:
            policy.unlink(missing_ok=True)
        postfix = find_tool("postfix")
        if postfix:  # in case a post-install hook started it anyway
            subprocess.run([postfix, "stop"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False)
    return find_tool("smtp-sink") is not None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_banner(port: int, timeout: float = 10.0) -> None:
    """Return once an SMTP greeting can be read on 127.0.0.1:port; TimeoutError otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"no SMTP server on 127.0.0.1:{port}")
        time.sleep(0.05)


@dataclass
class Sink:
    kind: str  # "smtp-sink" or "aiosmtpd"
    port: int
    process: subprocess.Popen[bytes]
    description: str

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_sink(choice: str = "auto", install: bool = False, log: callable = print) -> Sink:  # type: ignore[valid-type]
    """Start the sink named by ``choice`` ("auto", "smtp-sink", "aiosmtpd") on a free port."""
    if choice in ("auto", "smtp-sink"):
        binary = find_tool("smtp-sink")
        if binary is None and install:
            install_postfix(log)
            binary = find_tool("smtp-sink")
        if binary is not None:
            port = free_port()
            command = [binary]
            if os.geteuid() == 0:
                command += ["-u", "nobody"]  # smtp-sink refuses to run as root without -u
            command += [f"127.0.0.1:{port}", "1024"]
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                wait_for_banner(port)
            except TimeoutError:
                process.kill()
                err = process.stderr.read().decode(errors="replace") if process.stderr else ""
                log(f"smtp-sink did not start: {err.strip()}")
            else:
                return Sink("smtp-sink", port, process, f"Postfix smtp-sink ({binary}), PIPELINING advertised")
        if choice == "smtp-sink":
            raise RuntimeError("smtp-sink not available (try --install-sink)")
        log("smtp-sink not found: falling back to an aiosmtpd sink (pass --install-sink to install postfix)")
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "benchmarks.sinks", str(port)], stdout=subprocess.DEVNULL)
    wait_for_banner(port)
    return Sink("aiosmtpd", port, process, "aiosmtpd sink in a subprocess (uvloop), messages discarded")


def _serve_aiosmtpd(port: int) -> None:
    import asyncio

    from aiosmtpd.smtp import SMTP

    class Discard:
        async def handle_DATA(self, server: object, session: object, envelope: object) -> str:
            return "250 2.0.0 Ok: discarded"

    async def main() -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: SMTP(Discard(), hostname="aiosmtpd-sink"), "127.0.0.1", port)
        async with server:
            await server.serve_forever()

    try:
        import uvloop

        uvloop.run(main())
    except ImportError:
        asyncio.run(main())


if __name__ == "__main__":
    _serve_aiosmtpd(int(sys.argv[1]))
