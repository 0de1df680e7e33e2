"""TLS, STARTTLS and AUTH go through aiosmtplib; pipelining takes over after them."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import trustme
from conftest import make_message
from smtpserver import FaultyServer

from pool import RelayError, SMTPPool

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def trust_test_ca(ca: trustme.CA, monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Iterator[None]:
    bundle = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
    yield


@pytest.mark.parametrize("pipelining", [None, False], ids=["pipelined", "command"])
async def test_starttls_and_auth_then_many_messages(
    server_context: ssl.SSLContext, pipelining: bool | None
) -> None:
    async with FaultyServer(starttls_context=server_context, credentials=("user", "s3cret")) as srv:
        async with SMTPPool(hostname="127.0.0.1", port=srv.port, size=2, validate_certs=False,
                            username="user", password="s3cret", pipelining=pipelining) as pool:
            results = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(40)))
        assert all(r.attempts == 1 for r in results)
        assert len(srv.messages) == 40
        assert srv.auth_attempts and all(ok for _, ok in srv.auth_attempts)


@pytest.mark.parametrize("pipelining", [None, False], ids=["pipelined", "command"])
async def test_implicit_tls_with_certificate_validation(
    server_context: ssl.SSLContext, trust_test_ca: None, pipelining: bool | None
) -> None:
    async with FaultyServer(tls_context=server_context) as srv:
        async with SMTPPool(hostname="127.0.0.1", port=srv.port, size=2, use_tls=True,
                            pipelining=pipelining) as pool:
            results = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(20)))
        assert len(results) == 20 == len(srv.messages)


async def test_untrusted_certificate_is_refused_by_default(server_context: ssl.SSLContext) -> None:
    async with FaultyServer(tls_context=server_context) as srv:
        async with SMTPPool(hostname="127.0.0.1", port=srv.port, size=1, use_tls=True,
                            max_attempts=2, backoff_base=0.001) as pool:
            with pytest.raises(RelayError) as failed:
                await pool.submit(make_message(1))
            with pytest.raises(RelayError):
                await pool.submit(make_message(2))  # at once: the pool stopped connecting
        assert failed.value.transient is False
        assert "certificate" in str(failed.value)
        assert srv.messages == []


async def test_bad_password_stops_the_pool_after_one_login_and_is_never_logged() -> None:
    async with FaultyServer(credentials=("user", "right")) as srv:
        with structlog.testing.capture_logs() as logs:
            async with SMTPPool(hostname="127.0.0.1", port=srv.port, size=4, start_tls=False,
                                username="user", password="hunter2-wrong") as pool:
                outcomes = await asyncio.gather(*(pool.submit(make_message(i)) for i in range(50)),
                                                return_exceptions=True)
                with pytest.raises(RelayError):
                    await pool.submit(make_message(99))
    failed = outcomes[0]
    assert all(isinstance(o, RelayError) and not o.transient for o in outcomes), outcomes[:3]
    assert isinstance(failed, RelayError)
    assert failed.code == 535
    assert str(failed).startswith(f"relay 127.0.0.1:{srv.port} refused the login: 535")
    # One AUTH: not PLAIN, then LOGIN (aiosmtplib's login() tries each); lockouts count both.
    assert len(srv.auth_attempts) == 1, srv.auth_attempts
    assert logs, "the failure was logged"
    assert "hunter2-wrong" not in repr(logs)
    assert "hunter2-wrong" not in repr(failed) + str(failed)


async def test_private_ca_is_trusted_through_ca_file(
    server_context: ssl.SSLContext, ca: trustme.CA, tmp_path: Any
) -> None:
    bundle = tmp_path / "private-ca.pem"
    ca.cert_pem.write_to_path(str(bundle))
    async with FaultyServer(tls_context=server_context) as srv:
        async with SMTPPool(hostname="127.0.0.1", port=srv.port, size=1, use_tls=True, ca_file=str(bundle)) as pool:
            result = await pool.submit(make_message(1))
        context = ssl.create_default_context()
        ca.configure_trust(context)
        async with SMTPPool(hostname="127.0.0.1", port=srv.port, size=1, use_tls=True, tls_context=context) as pool:
            await pool.submit(make_message(2))
    assert result.attempts == 1
    assert len(srv.messages) == 2
