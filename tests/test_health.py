"""The relay's health (pool/health.py): a pure state machine, tested without a server;
the errors' fields (pool/errors.py), all given in their constructors; the typed
``SMTPPool.from_settings``."""

from __future__ import annotations

import random

import pytest
from pydantic import SecretStr

from pool import DeliveryError, RelayError, SMTPPool
from pool.config import PoolSettings, RetrySettings, SMTPSettings
from pool.health import RelayHealth, RelayState

pytestmark = pytest.mark.timeout(10)


def health(down_timeout: float = 10.0) -> RelayHealth:
    return RelayHealth("relay.example:25", down_timeout=down_timeout, backoff_base=0.5, backoff_max=60.0,
                       rng=random.Random(7))


def test_a_new_relay_is_up() -> None:
    relay = health()
    assert relay.state is RelayState.UP
    assert not relay.is_failing() and not relay.is_down() and not relay.is_refused()
    assert relay.up_gauge(session_open=False) == 1.0
    assert repr(relay) == "<RelayHealth relay.example:25 up failures=0>"


def test_failed_connects_with_no_session_open_are_failing_then_down_after_the_timeout() -> None:
    relay = health(down_timeout=10.0)
    delay, declared = relay.connect_failed(100.0, "connection refused", code=None, session_open=False)
    assert declared is None and relay.state is RelayState.FAILING and relay.down_since == 100.0
    assert 0.05 <= delay <= 10.0  # never a busy loop; never past the moment it must be declared down
    assert relay.up_gauge(session_open=False) == 0.0  # the alert sees the outage while it lasts
    assert relay.up_gauge(session_open=True) == 1.0

    delay, declared = relay.connect_failed(104.0, "connection refused", code=None, session_open=False)
    assert declared is None and delay <= 6.0 and relay.failures == 2

    delay, declared = relay.connect_failed(110.0, "connection refused", code=None, session_open=False)
    assert relay.state is RelayState.DOWN and relay.is_down() and not relay.is_refused()
    assert isinstance(declared, RelayError) and declared is relay.error
    assert declared.transient and declared.relay == "relay.example:25"
    assert str(declared) == "relay relay.example:25 unreachable for 10 s: connection refused"
    _, again = relay.connect_failed(200.0, "connection refused", code=None, session_open=False)
    assert again is None and relay.error is declared  # declared once


def test_a_failure_while_another_session_is_open_is_a_blip_not_an_outage() -> None:
    relay = health(down_timeout=1.0)
    relay.connect_failed(0.0, "reset", code=None, session_open=False)
    _, declared = relay.connect_failed(50.0, "reset", code=None, session_open=True)
    assert declared is None and relay.state is RelayState.UP and relay.down_since is None


def test_a_session_that_opens_brings_the_relay_back_up() -> None:
    relay = health(down_timeout=1.0)
    assert relay.connected() is False  # it was not down: nothing to announce
    relay.connect_failed(0.0, "timeout", code=None, session_open=False)
    relay.connect_failed(5.0, "timeout", code=None, session_open=False)
    assert relay.is_down()
    assert relay.connected() is True
    assert relay.state is RelayState.UP and relay.error is None and relay.failures == 0


def test_a_refused_session_is_refused_for_good_and_the_first_reason_is_kept() -> None:
    relay = health(down_timeout=1.0)
    relay.connect_failed(0.0, "timeout", code=None, session_open=False)
    relay.connect_failed(5.0, "timeout", code=None, session_open=False)
    error = relay.refused("535 bad password", code=535)
    assert relay.state is RelayState.REFUSED and relay.is_refused() and not relay.is_down()
    assert not error.transient and error.code == 535 and relay.error is error
    assert relay.refused("certificate not trusted", code=None) is error
    _, declared = relay.connect_failed(9.0, "timeout", code=None, session_open=False)
    assert declared is None and relay.error is error


def test_errors_get_every_field_in_their_constructor() -> None:
    relay_error = RelayError("down", transient=True, relay="r:25", code=421, refused={"a@x.org": (550, "no")},
                             recipients=("b@x.org",), maybe_delivered=True)
    assert (relay_error.refused, relay_error.recipients, relay_error.maybe_delivered) == (
        {"a@x.org": (550, "no")}, ("b@x.org",), True)
    delivery = DeliveryError("not delivered: 550 no", code=550, response="no", permanent=True, attempts=1,
                             refused={"b@x.org": (550, "no")}, message_id="<m@x>")
    named = delivery.through("backup", {"a@x.org": (550, "gone")})
    assert named is not delivery and delivery.relay is None  # the pool's error is left as it was
    assert named.relay == "backup" and str(named) == str(delivery)
    assert named.refused == {"a@x.org": (550, "gone"), "b@x.org": (550, "no")}
    assert (named.code, named.permanent, named.attempts, named.message_id) == (550, True, 1, "<m@x>")


def test_from_settings_takes_the_typed_sections() -> None:
    smtp = SMTPSettings(hostname="127.0.0.1", port=2525, username="u", password=SecretStr("p"), timeout=7.0,
                        relay_down_timeout=42.0)
    pool = SMTPPool.from_settings(smtp, PoolSettings.model_validate({"size": 3, "pipeline_depth": 2}),
                                  RetrySettings.model_validate({"max_attempts": 2}))
    assert (pool.size, pool.pipeline_depth, pool.max_attempts, pool.relay_down_timeout) == (3, 2, 2, 42.0)
    assert repr(pool) == "<SMTPPool 127.0.0.1:2525 new size=3 busy=0 idle=0 queued=0 unfinished=0>"
    defaults = SMTPPool.from_settings(smtp)
    assert (defaults.size, defaults.max_attempts, defaults.queue_size) == (4, 5, 1000)
