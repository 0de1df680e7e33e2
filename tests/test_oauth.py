"""OAuth 2.0 login: AUTH XOAUTH2 (through aiosmtplib's ``auth_xoauth2``) and AUTH
OAUTHBEARER (RFC 7628), against tests/smtpserver.py with both mechanisms and STARTTLS
(trustme); the token from a command, a file or a coroutine, refreshed before it expires
and when the relay refuses it; never logged."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from conftest import make_message
from smtpserver import FaultyServer
from test_dispatcher import dispatcher, job, write_jobs
from test_run_relays import dispatcher_lines, rows, smtp, write_yaml

from dispatcher.config import ConfigError, parse_settings
from pool import RelayError, SMTPPool
from pool.oauth import OAuth2

pytestmark = pytest.mark.timeout(60)

USER = "news@example.org"


@pytest.fixture
async def relay(server_context: ssl.SSLContext) -> AsyncIterator[FaultyServer]:
    async with FaultyServer(starttls_context=server_context, oauth_tokens={"tok-1"}) as server:
        yield server


class Tokens:
    """A token endpoint: hands out tok-1, tok-2... each valid for ``expires_in`` seconds."""

    def __init__(self, expires_in: float = 3600) -> None:
        self.expires_in = expires_in
        self.issued = 0

    async def __call__(self) -> tuple[str, float]:
        self.issued += 1
        return f"tok-{self.issued}", time.time() + self.expires_in


def pool_for(server: FaultyServer, ca_file: str, oauth2: OAuth2, **options: Any) -> SMTPPool:
    return SMTPPool(hostname="127.0.0.1", port=server.port, ca_file=ca_file, username=USER, oauth2=oauth2,
                    backoff_base=0.01, backoff_max=0.05, **options)


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
@pytest.mark.parametrize("pipelining", [None, False], ids=["pipelined", "command"])
async def test_a_token_logs_in_over_starttls_and_one_fetch_serves_every_session(
    relay: FaultyServer, ca_file: str, mechanism: Any, pipelining: bool | None
) -> None:
    tokens = Tokens()
    oauth2 = OAuth2(fetch=tokens, mechanism=mechanism)
    async with pool_for(relay, ca_file, oauth2, size=3, max_messages_per_connection=4, pipelining=pipelining) as pool:
        results = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(24)))
    assert all(r.attempts == 1 for r in results) and len(relay.messages) == 24
    assert tokens.issued == 1  # sessions opening at once wait for one fetch
    assert len(relay.oauth_attempts) >= 6  # a session per 4 messages
    assert set(relay.oauth_attempts) == {(mechanism.upper(), USER, "tok-1", True)}


@pytest.mark.parametrize("mechanism", ["xoauth2", "oauthbearer"])
async def test_a_refused_token_is_replaced_and_the_login_tried_once_more_mid_run(
    relay: FaultyServer, ca_file: str, mechanism: Any
) -> None:
    tokens = Tokens()
    async with pool_for(relay, ca_file, OAuth2(fetch=tokens, mechanism=mechanism), size=1,
                        max_messages_per_connection=5) as pool:
        first = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(5)))
        relay.oauth_tokens = {"tok-2"}  # tok-1 revoked (or expired early) while the run goes on
        second = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(5, 10)))
    assert all(r.attempts == 1 for r in first + second) and len(relay.messages) == 10
    assert [(token, ok) for _, _, token, ok in relay.oauth_attempts] == [
        ("tok-1", True), ("tok-1", False), ("tok-2", True)]
    # Each mechanism ends the failed exchange as its specification says: XOAUTH2 with an
    # empty line, OAUTHBEARER (RFC 7628 section 3.2.3) with %x01.
    assert relay.oauth_error_answers == [b"" if mechanism == "xoauth2" else b"\x01"]


async def test_a_token_due_to_expire_is_replaced_before_the_next_login(relay: FaultyServer, ca_file: str) -> None:
    # 100 s left is within refresh_before (300 s): each new session gets a new token.
    tokens = Tokens(expires_in=100)
    relay.oauth_tokens = {f"tok-{n}" for n in range(1, 20)}
    async with pool_for(relay, ca_file, OAuth2(fetch=tokens), size=1, max_messages_per_connection=2) as pool:
        for i in range(6):
            await pool.submit(make_message(i))
    used = [token for _, _, token, ok in relay.oauth_attempts if ok]
    assert used == ["tok-1", "tok-2", "tok-3"] and tokens.issued == 3


async def test_a_token_refused_twice_stops_the_pool_and_is_never_logged(
    relay: FaultyServer, ca_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    relay.oauth_tokens = {"never-issued"}
    tokens = Tokens()
    caplog.set_level(logging.DEBUG)
    with structlog.testing.capture_logs() as logs:
        async with pool_for(relay, ca_file, OAuth2(fetch=tokens), size=2) as pool:
            with pytest.raises(RelayError) as failed:
                await pool.submit(make_message(1))
    assert failed.value.transient is False
    assert str(failed.value) == f"relay 127.0.0.1:{relay.port} refused the login: 535 5.7.8 Username and Password not accepted"
    assert tokens.issued == 2 and len(relay.oauth_attempts) == 2  # one session, one retry with a new token
    said = repr(logs) + caplog.text + repr(failed.value) + repr(pool)
    assert "tok-" not in said and relay.messages == []


async def test_a_relay_without_the_mechanism_is_refused_naming_what_it_offers(
    server_context: ssl.SSLContext, ca_file: str
) -> None:
    async with FaultyServer(starttls_context=server_context, credentials=("u", "p")) as server:
        async with pool_for(server, ca_file, OAuth2(fetch=Tokens())) as pool:
            with pytest.raises(RelayError, match=r"does not offer the authentication method XOAUTH2 "
                                                 r"\(it offers: LOGIN PLAIN\)") as failed:
                await pool.submit(make_message(1))
    assert failed.value.transient is False


async def test_the_token_comes_from_a_command_or_a_file(relay: FaultyServer, ca_file: str, tmp_path: Path) -> None:
    token_file = tmp_path / "token.json"
    token_file.write_text(json.dumps({"access_token": "tok-1", "expires_in": 3599, "token_type": "Bearer"}))
    sources = [OAuth2(command=[sys.executable, "-c", "print('tok-1')"]), OAuth2(file=token_file)]
    for oauth2 in sources:
        async with pool_for(relay, ca_file, oauth2, size=1) as pool:
            await pool.submit(make_message(1))
        assert oauth2.fetches == 1
    assert [ok for *_, ok in relay.oauth_attempts] == [True, True]


@pytest.mark.parametrize(("source", "reason", "permanent"), [
    ({"command": "/nonexistent/get-token"}, "oauth2 token command '/nonexistent/get-token': no such command", True),
    ({"command": [sys.executable, "-c", "import sys; sys.exit('invalid_grant')"]}, "exited 1: invalid_grant", False),
    ({"file": "/nonexistent/token"}, "oauth2 token file /nonexistent/token: no such file", True),
])
async def test_no_token_is_a_session_failure_naming_the_source(
    relay: FaultyServer, ca_file: str, source: dict[str, Any], reason: str, permanent: bool
) -> None:
    oauth2 = OAuth2(**source)
    async with pool_for(relay, ca_file, oauth2, size=1, relay_down_timeout=0.2) as pool:
        with pytest.raises(RelayError) as failed:
            await pool.submit(make_message(1))
    assert reason in str(failed.value)
    assert failed.value.transient is not permanent
    assert relay.oauth_attempts == []


def test_oauth2_config_errors_name_the_key() -> None:
    def error(smtp_section: dict[str, Any]) -> str:
        with pytest.raises(ConfigError) as failed:
            parse_settings({"smtp": {"hostname": "smtp.gmail.com", **smtp_section}})
        return str(failed.value)

    assert "give exactly one of token_command and token_file" in error(
        {"username": USER, "oauth2": {"token_command": "x", "token_file": "y"}})
    assert "give exactly one of token_command and token_file" in error({"username": USER, "oauth2": {}})
    assert "oauth2 needs username" in error({"oauth2": {"token_command": "x"}})
    assert "oauth2 needs username" in error({"username": USER, "password": "p", "oauth2": {"token_command": "x"}})
    assert "smtp.oauth2.mechanism" in error({"username": USER, "oauth2": {"token_command": "x", "mechanism": "plain"}})


async def test_dispatcher_run_and_check_config_log_in_with_xoauth2(
    relay: FaultyServer, ca_file: str, tmp_path: Path
) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("tok-1\n")
    config = write_yaml(tmp_path / "gmail.yaml", {"smtp": smtp(
        relay.port, ca_file=ca_file, username=USER, oauth2={"token_file": str(token_file)})})
    code, out, err = await dispatcher("check-config", str(config), "--connect", cwd=tmp_path)
    assert code == 0, err
    assert f"logged in as {USER} with XOAUTH2 (AUTH " in out, out
    jobs = write_jobs(tmp_path / "jobs.jsonl", [job(i) for i in range(30)])
    code, _, err = await dispatcher("run", str(jobs), "--config", str(config), "--no-progress", cwd=tmp_path)
    assert code == 0, err
    assert [row["status"] for row in rows(tmp_path / "jobs.results.jsonl")] == ["sent"] * 30
    assert {(m, ok) for m, _, _, ok in relay.oauth_attempts} == {("XOAUTH2", True)}
    assert "tok-1" not in out + err
    token_file.write_text("tok-expired\n")  # the agent that writes the file stopped renewing it
    code, _, err = await dispatcher("check-config", str(config), "--connect", cwd=tmp_path)
    assert code == 2
    assert dispatcher_lines(err) == [f"dispatcher: relay 127.0.0.1:{relay.port} refused the login: "
                                     "535 5.7.8 Username and Password not accepted"]
