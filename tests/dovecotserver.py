"""A private Dovecot IMAP server for tests: its own config, state and Maildirs under a
temporary directory, IMAPS on a free 127.0.0.1 port with a trustme certificate.

Dovecot's master must start as root (it runs the mail processes as the ``dovecot``
user); without root or without the binary the test is skipped, and fails under CI=true.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import trustme
from _support import free_port, missing


def need_dovecot() -> str:
    binary = shutil.which("dovecot") or ("/usr/sbin/dovecot" if os.path.exists("/usr/sbin/dovecot") else None)
    problem = None
    if binary is None:
        problem = "dovecot is not installed (Debian: dovecot-imapd)"
    elif os.geteuid() != 0:
        problem = "a private dovecot needs root (its master runs mail processes as the dovecot user)"
    if problem is not None:
        missing(problem)
    assert binary is not None
    return binary


@dataclass
class Dovecot:
    root: Path
    port: int
    ca_file: Path
    user: str
    password: str
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"imaps://{self.user}@127.0.0.1:{self.port}/INBOX"

    def log(self) -> str:
        path = self.root / "dovecot.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)


def start_dovecot(user: str = "bounce", password: str = "imap-pass-0123") -> Dovecot:
    binary = need_dovecot()
    # Not under pytest's tmp_path: dovecot's unprivileged processes must reach base_dir.
    root = Path(tempfile.mkdtemp(prefix="dovecot-test-"))
    root.chmod(0o755)
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(root / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(root / "cert.pem"))
    ca.cert_pem.write_to_path(str(root / "ca.pem"))
    (root / "users").write_text(f"{user}:{{PLAIN}}{password}\n")
    home = root / "home"
    home.mkdir()
    shutil.chown(home, "dovecot", "dovecot")
    port = free_port()
    (root / "dovecot.conf").write_text(f"""\
base_dir = {root}/run
state_dir = {root}/state
log_path = {root}/dovecot.log
protocols = imap
listen = 127.0.0.1
ssl = required
ssl_cert = <{root}/cert.pem
ssl_key = <{root}/key.pem
auth_mechanisms = plain
first_valid_uid = 1
auth_failure_delay = 0
mail_location = maildir:{home}/%u/Maildir
service imap-login {{
  inet_listener imap {{
    port = 0
  }}
  inet_listener imaps {{
    port = {port}
    ssl = yes
  }}
}}
passdb {{
  driver = passwd-file
  args = scheme=PLAIN username_format=%u {root}/users
}}
userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={home}/%u
}}
""")
    process = subprocess.Popen([binary, "-F", "-c", str(root / "dovecot.conf")], stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    server = Dovecot(root, port, root / "ca.pem", user, password, process)
    deadline = time.monotonic() + 15
    while True:
        if process.poll() is not None:
            err = process.stderr.read().decode(errors="replace") if process.stderr else ""
            server.stop()
            raise RuntimeError(f"dovecot exited {process.returncode}: {err}{server.log()}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"dovecot did not listen on {port}: {server.log()}") from None
            time.sleep(0.05)
