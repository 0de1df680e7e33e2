"""``dispatcher check-config FILE --connect``: one session per relay (TLS, EHLO, AUTH),
what it offers, QUIT, nothing sent; exit 2 with the reason ``run`` gives otherwise.

The command runs in a subprocess against tests/smtpserver.py with trustme certificates.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import pytest
from _support import free_port
from smtpserver import FaultyServer
from test_dispatcher import dispatcher
from test_run_relays import dispatcher_lines, smtp, write_yaml

pytestmark = pytest.mark.timeout(60)

# The system's CAs only, whatever the caller's shell says: the test CA is trusted only through ca_file.
NO_CA_ENV = {"SSL_CERT_FILE": "", "SSL_CERT_DIR": ""}


async def check(config: Path, tmp_path: Path, **env: str) -> tuple[int, str, str]:
    return await dispatcher("check-config", str(config), "--connect", cwd=tmp_path, env={**NO_CA_ENV, **env})


async def test_starttls_and_login_show_what_the_relay_offers_and_nothing_is_sent(
    server_context: ssl.SSLContext, ca_file: str, tmp_path: Path
) -> None:
    async with FaultyServer(starttls_context=server_context, credentials=("user", "s3cret"), smtputf8=True) as srv:
        config = write_yaml(tmp_path / "relay.yaml", {"smtp": smtp(
            srv.port, ca_file=ca_file, username="user", password="${SMTP_PASSWORD}")})
        code, out, err = await check(config, tmp_path, SMTP_PASSWORD="s3cret")
    assert code == 0, err
    relay = f"127.0.0.1:{srv.port}"
    assert f"relay {relay}: session ok in " in out, out
    assert ": STARTTLS, TLSv1." in out and "certificate verified" in out, out
    assert "logged in as user (AUTH " in out and "PLAIN" in out, out
    offers = next(line for line in out.splitlines() if "offers:" in line)
    assert offers.startswith("    offers: PIPELINING, ") and "8BITMIME" in offers and "SMTPUTF8" in offers, out
    assert "not " in offers and "CHUNKING" in offers, out  # aiosmtpd offers no CHUNKING
    assert "nothing was sent" in out
    assert "s3cret" not in out + err
    assert srv.messages == [] and srv.auth_attempts == [("user", True)]
    assert len(srv.sessions) == 1 and srv.sessions[0].quit, srv.sessions
    assert not any(c.startswith(("MAIL", "RCPT", "DATA")) for c in srv.sessions[0].commands)


async def test_implicit_tls_without_a_login(server_context: ssl.SSLContext, ca_file: str, tmp_path: Path) -> None:
    async with FaultyServer(tls_context=server_context) as srv:
        config = write_yaml(tmp_path / "relay.yaml", {"smtp": smtp(srv.port, use_tls=True, ca_file=ca_file)})
        code, out, err = await check(config, tmp_path)
    assert code == 0, err
    assert "implicit TLS, TLSv1." in out and "no login" in out, out


async def test_a_wrong_password_exits_2_with_the_reason_run_gives(
    server_context: ssl.SSLContext, ca_file: str, tmp_path: Path
) -> None:
    jobs = tmp_path / "jobs.jsonl"
    jobs.write_text('{"id": "j1", "from": "a@example.org", "to": ["b@example.net"], "subject": "s", "text": "t"}\n')
    async with FaultyServer(starttls_context=server_context, credentials=("user", "right")) as srv:
        config = write_yaml(tmp_path / "relay.yaml", {"smtp": smtp(
            srv.port, ca_file=ca_file, username="user", password="${SMTP_PASSWORD}")})
        code, out, err = await check(config, tmp_path, SMTP_PASSWORD="hunter2-wrong")
        run_code, _, run_err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress",
                                                cwd=tmp_path, env={**NO_CA_ENV, "SMTP_PASSWORD": "hunter2-wrong"})
    assert code == 2 == run_code, (err, run_err)
    said = dispatcher_lines(err)
    assert said == [line for line in dispatcher_lines(run_err)], (said, run_err)
    assert said[0].startswith(f"dispatcher: relay 127.0.0.1:{srv.port} refused the login: 535 "), said
    assert f"relay 127.0.0.1:{srv.port}: no session" in out and "1 of 1 relays refused" in out, out
    assert "hunter2-wrong" not in out + err
    assert srv.messages == []


@pytest.mark.parametrize("case", ["untrusted certificate", "no STARTTLS", "unreachable"])
async def test_a_relay_refusing_the_session_exits_2_naming_why(
    case: str, server_context: ssl.SSLContext, tmp_path: Path
) -> None:
    server: dict[str, Any] = {"untrusted certificate": {"starttls_context": server_context},
                              "no STARTTLS": {"credentials": ("user", "pw")},
                              "unreachable": {}}[case]
    async with FaultyServer(**server) as srv:
        port = free_port() if case == "unreachable" else srv.port
        config = write_yaml(tmp_path / "relay.yaml", {"smtp": smtp(port, username="user", password="pw")})
        code, _, err = await check(config, tmp_path)
    assert code == 2, err
    said = dispatcher_lines(err)
    assert len(said) == 1, err
    expected = {"untrusted certificate": f"dispatcher: relay 127.0.0.1:{port}: TLS certificate not trusted: ",
                "no STARTTLS": f"dispatcher: relay 127.0.0.1:{port} does not offer STARTTLS; ",
                "unreachable": f"dispatcher: cannot connect to relay 127.0.0.1:{port}: "}[case]
    assert said[0].startswith(expected), said
    assert "pw" not in said[0].split(":", 1)[1].replace(str(port), "")


async def test_every_relay_is_checked_and_one_refusing_is_exit_2(tmp_path: Path) -> None:
    async with FaultyServer() as good, FaultyServer(credentials=("user", "right")) as bad:
        config = write_yaml(tmp_path / "relays.yaml", {"relays": [
            {"name": "primary", **smtp(good.port)},
            {"name": "backup", **smtp(bad.port, start_tls=False, username="user", password="wrong")},
        ]})
        code, out, err = await check(config, tmp_path)
    assert code == 2, err
    assert f"relay primary (127.0.0.1:{good.port}): session ok" in out and "no TLS (plain text)" in out, out
    assert "relay backup: no session" in out and "1 of 2 relays refused" in out, out
    assert dispatcher_lines(err) == [f"dispatcher: relay 127.0.0.1:{bad.port} refused the login: 535 5.7.8 "
                                     "Authentication credentials invalid"], err
    assert len(good.sessions) == 1 and good.sessions[0].quit and good.messages == []


async def test_no_relay_configured_is_nothing_to_connect_to(tmp_path: Path) -> None:
    config = tmp_path / "empty.yaml"
    config.write_text("pool:\n  size: 2\n")
    code, out, err = await check(config, tmp_path)
    assert code == 0, err
    assert "no relay configured" in out
