"""A private Postfix instance for tests: its own config_directory, queue and Maildirs
under a temporary directory, smtpd on a free 127.0.0.1 port.

What it does with mail (all local, no DNS):

- ``*@test.example``: local(8) with no recipient table: accepted at RCPT, then
  bounced as ``unknown user`` (5.1.1): a real Postfix DSN, some seconds later.
- ``@example.com`` and ``@example.org``: virtual(8) Maildirs under ``mail/``;
  ``bounces@example.org`` (with ``+`` as recipient delimiter: every VERP address) is the
  bounce Maildir, ``good@example.com`` a mailbox; any other address there is refused at
  RCPT with 550 5.1.1.
- ``vacation@example.com``: a pipe that answers the envelope sender with an RFC 3834
  auto-reply (``Auto-Submitted: auto-replied``), sent back through this Postfix.

``start_postfix(main_cf={...})`` adds or overrides main.cf settings; with
``DISCARD_ALL`` every message goes to discard(8): queued, logged ``status=sent``, thrown
away (``discarded()``, ``sessions()`` read what the log says).

The master must be started by root (``postfix start`` runs its daemons as ``postfix``);
without root or Postfix the test is skipped, and fails under CI=true.
"""

from __future__ import annotations

import asyncio
import grp
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from _support import free_port, missing

AUTOREPLY = '''\
import smtplib, sys
from email import message_from_binary_file
original = message_from_binary_file(sys.stdin.buffer)
sender = sys.argv[1]
if sender and original.get("Auto-Submitted", "no").lower() == "no":
    reply = (f"From: Vacation <vacation@example.com>\\r\\nTo: {sender}\\r\\n"
             f"Subject: Auto: {original.get('Subject', '')}\\r\\nAuto-Submitted: auto-replied\\r\\n"
             f"In-Reply-To: {original.get('Message-ID', '')}\\r\\n\\r\\nI am away until Monday.\\r\\n")
    with smtplib.SMTP("127.0.0.1", int(sys.argv[2]), timeout=10) as smtp:
        smtp.sendmail("", [sender], reply.encode())
'''


#: main.cf settings that send every message to discard(8), whatever its domain.
DISCARD_ALL = {"mydestination": "", "virtual_mailbox_domains": "", "default_transport": "discard",
               "relay_transport": "discard", "local_transport": "discard", "virtual_transport": "discard",
               "transport_maps": ""}
_DISCARDED = re.compile(r"postfix/discard\[\d+\]: \w+: to=<([^>]*)>.*status=sent")
_SESSION = re.compile(r"postfix/smtpd\[\d+\]: disconnect from \S+ (.*)$")


def need_postfix() -> str:
    binary = shutil.which("postfix") or ("/usr/sbin/postfix" if os.path.exists("/usr/sbin/postfix") else None)
    problem = None
    if binary is None:
        problem = "postfix is not installed (Debian: postfix)"
    elif os.geteuid() != 0:
        problem = "a private postfix needs root (its master runs the daemons as the postfix user)"
    else:
        try:
            pwd.getpwnam("postfix")
            grp.getgrnam("postdrop")
        except KeyError:
            problem = "the postfix user or postdrop group is missing"
    if problem is not None:
        missing(problem)
    assert binary is not None
    return binary


def _python() -> str:
    """A Python the pipe's user (nobody) may run: the system's, not a private venv's."""
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


@dataclass
class Postfix:
    root: Path
    port: int
    binary: str

    @property
    def config(self) -> Path:
        return self.root / "conf"

    @property
    def bounce_maildir(self) -> Path:
        return self.root / "mail" / "bounces"

    def maildir_count(self, name: str) -> int:
        box = self.root / "mail" / name
        return sum(len(os.listdir(box / sub)) for sub in ("new", "cur") if (box / sub).is_dir())

    def log(self) -> str:
        path = self.root / "maillog"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_for(self, name: str, count: int, timeout: float = 30.0) -> None:
        """Until the Maildir ``name`` holds ``count`` messages (Postfix delivers on its own time)."""
        deadline = time.monotonic() + timeout
        while self.maildir_count(name) < count:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: {self.maildir_count(name)} of {count} messages after {timeout} s\n"
                                   + self.log()[-4000:])
            time.sleep(0.1)

    def discarded(self) -> Counter[str]:
        """Recipients discard(8) took, one per copy (with ``DISCARD_ALL``)."""
        return Counter(m.group(1) for line in self.log().splitlines() if (m := _DISCARDED.search(line)))

    def sessions(self) -> list[dict[str, int]]:
        """smtpd's command counts per ended session that said EHLO, e.g. {"mail": 3,
        "bdat": 3, ...}: every command given, refused ones included (``bdat=39/40``)."""
        found = []
        for line in self.log().splitlines():
            if m := _SESSION.search(line):
                counts = dict(part.split("=", 1) for part in m.group(1).split() if "=" in part)
                session = {name: int(value.rsplit("/", 1)[-1]) for name, value in counts.items()}
                if "ehlo" in session:
                    found.append(session)
        return found

    async def until(self, done: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
        """Wait, without blocking the event loop, until ``done()`` (Postfix logs and
        delivers on its own time); TimeoutError naming ``what`` otherwise."""
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} after {timeout} s\n" + self.log()[-4000:])
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        """Stop the master and wait for it to exit (its daemons write into the queue while
        they shut down), then remove the instance's directory."""
        try:
            master = int((self.root / "queue" / "pid" / "master.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            master = None
        subprocess.run([self.binary, "-c", str(self.config), "stop"], capture_output=True, timeout=30)
        deadline = time.monotonic() + 10
        while master is not None and _alive(master):
            if time.monotonic() > deadline:
                # A master started from a test's thread may outlive 'postfix stop': end it
                # and its daemons, so that no instance is left listening after the test.
                for pid in [master, *_children(master)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                break
            time.sleep(0.05)
        shutil.rmtree(self.root, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


def _children(parent: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    if int(stat.read().rpartition(")")[2].split()[1]) == parent:
                        found.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue
    return found


#: Linux queues at most net.unix.max_dgram_qlen datagrams on a unix-dgram socket (10 by
#: default). Every Postfix daemon logs through postlogd's socket (maillog_file), and
#: postlogd logs to it too: when a start's burst fills the queue, postlogd blocks on its
#: own socket, and with it every daemon (smtpd never greets, 'postfix stop' hangs).
DGRAM_QUEUE = Path("/proc/sys/net/unix/max_dgram_qlen")
DGRAM_QUEUE_NEEDED = 512


def _room_for_postlog() -> None:
    try:
        if int(DGRAM_QUEUE.read_text()) >= DGRAM_QUEUE_NEEDED:
            return
        DGRAM_QUEUE.write_text(str(DGRAM_QUEUE_NEEDED))  # root, as the private instance needs anyway
    except (OSError, ValueError) as exc:
        raise RuntimeError(f"net.unix.max_dgram_qlen must be at least {DGRAM_QUEUE_NEEDED} for postlogd "
                           f"(sysctl -w net.unix.max_dgram_qlen={DGRAM_QUEUE_NEEDED}): {exc}") from None


def start_postfix(main_cf: dict[str, str] | None = None, master_cf: str = "") -> Postfix:
    """A private Postfix; ``main_cf`` adds or overrides main.cf settings, ``master_cf``
    lines are appended to master.cf (e.g. tlsmgr for STARTTLS)."""
    binary = need_postfix()
    _room_for_postlog()
    root = Path(tempfile.mkdtemp(prefix="postfix-test-"))
    root.chmod(0o755)  # the postfix user reaches its queue and the Maildirs under it
    port = free_port()
    for sub in ("conf", "queue", "data", "mail"):
        (root / sub).mkdir()
    shutil.chown(root / "data", "postfix")
    shutil.chown(root / "mail", "postfix", "postfix")
    (root / "autoreply.py").write_text(AUTOREPLY)
    uid, gid = pwd.getpwnam("postfix").pw_uid, grp.getgrnam("postfix").gr_gid
    (root / "conf" / "main.cf").write_text(f"""\
compatibility_level = 3.6
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
command_directory = /usr/sbin
daemon_directory = /usr/lib/postfix/sbin
shlib_directory = /usr/lib/postfix
mail_owner = postfix
setgid_group = postdrop
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
myhostname = mta.test.example
mydomain = test.example
myorigin = test.example
mydestination = test.example
mynetworks = 127.0.0.0/8
local_recipient_maps =
alias_maps =
alias_database =
recipient_delimiter = +
virtual_mailbox_domains = example.org, example.com
virtual_mailbox_base = {root}/mail
virtual_mailbox_maps = inline:{{ bounces@example.org=bounces/, good@example.com=good/, vacation@example.com=vacation/ }}
virtual_uid_maps = static:{uid}
virtual_gid_maps = static:{gid}
transport_maps = inline:{{ vacation@example.com=autoreply: }}
autoreply_destination_recipient_limit = 1
smtpd_recipient_restrictions = permit_mynetworks, reject
biff = no
notify_classes =
delay_warning_time = 0
""" + "".join(f"{key} = {value}\n" for key, value in (main_cf or {}).items()))
    (root / "conf" / "master.cf").write_text(f"""\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
local     unix  -       n       n       -       -       local
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
autoreply unix  -       n       n       -       -       pipe
  flags=q user=nobody argv={_python()} {root}/autoreply.py ${{sender}} {port}
""" + master_cf)
    # Postfix does not read a main.cf or master.cf changed within the last second or so
    # (it may be half written): every command and daemon would poll it for ~2 s. These
    # are complete, so they are dated a minute back.
    a_minute_ago = time.time() - 60
    for written in ("main.cf", "master.cf"):
        os.utime(root / "conf" / written, (a_minute_ago, a_minute_ago))
    server = Postfix(root, port, binary)
    done = subprocess.run([binary, "-c", str(root / "conf"), "start"], capture_output=True, timeout=60)
    if done.returncode != 0:
        text = (done.stdout + done.stderr).decode(errors="replace") + server.log()
        server.stop()
        raise RuntimeError(f"postfix start failed ({done.returncode}): {text}")
    # Ready when smtpd greets, not when the port takes a connection: the kernel accepts
    # into master's backlog before master (slow to start on a loaded machine) runs smtpd.
    deadline = time.monotonic() + 25  # within the test's own time limit, with stop() after it
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return server
        except OSError:
            pass
        if time.monotonic() > deadline:
            log = server.log()
            server.stop()
            raise RuntimeError(f"postfix did not greet on {port} within 25 s: {log}")
        time.sleep(0.05)
