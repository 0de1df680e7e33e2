"""The helpers in tests/_support.py that every other test leans on."""

from __future__ import annotations

import socket

import pytest
from _support import free_port, missing


def test_a_missing_server_skips_here_and_fails_under_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception, match="redis-server is not installed"):
        missing("redis-server is not installed")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="redis-server is not installed"):
        missing("redis-server is not installed")


def test_free_port_can_be_listened_on() -> None:
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        assert sock.getsockname() == ("127.0.0.1", port)
