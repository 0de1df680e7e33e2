"""The relay's health as one pool sees it: up, failing, down, or refused. Pure: no I/O,
no tasks, the clock passed in; the pool asks the predicates and reports each connect.

    UP --connect failed, no session open--> FAILING --relay_down_timeout--> DOWN
    FAILING, DOWN --a session opened--> UP;   any --session refused--> REFUSED (for good)

FAILING holds the queue without spending attempts; DOWN fails every waiting and later
submit with ``RelayError(transient=True)`` while the first slot probes; REFUSED (AUTH
rejected, certificate not trusted) fails them with ``RelayError(transient=False)`` and
no session is tried again (docs/library.md promise 10). httpcore's connection states,
asked through ``is_available()``/``is_closed()``, are the model.
"""

from __future__ import annotations

import enum
import random

from pool.errors import RelayError
from pool.retry import backoff_delay


class RelayState(enum.Enum):
    UP = "up"  # a session opened, or none failed yet
    FAILING = "failing"  # connects fail and no session is open: messages wait, attempts unspent
    DOWN = "down"  # failing for relay_down_timeout: submits raise RelayError(transient=True)
    REFUSED = "refused"  # the relay refused the session for good: RelayError(transient=False)


class RelayHealth:
    """What the pool knows of its relay: the state, since when it fails, and the error
    submits raise while it is down or refused."""

    __slots__ = ("_rng", "backoff_base", "backoff_max", "down_since", "down_timeout", "error", "failures", "relay")

    def __init__(self, relay: str, *, down_timeout: float, backoff_base: float, backoff_max: float,
                 rng: random.Random | None = None) -> None:
        self.relay = relay
        self.down_timeout = down_timeout
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()
        self.error: RelayError | None = None  # set while DOWN or REFUSED
        self.down_since: float | None = None  # the first failed connect while no session was open
        self.failures = 0  # failed connects in a row

    def __repr__(self) -> str:
        return f"<RelayHealth {self.relay} {self.state.value} failures={self.failures}>"

    @property
    def state(self) -> RelayState:
        if self.error is not None:
            return RelayState.DOWN if self.error.transient else RelayState.REFUSED
        return RelayState.UP if self.down_since is None else RelayState.FAILING

    # -- predicates --

    def is_refused(self) -> bool:
        """Refused for good: connecting again would only repeat a failed login."""
        return self.error is not None and not self.error.transient

    def is_down(self) -> bool:
        """Down for ``relay_down_timeout`` (not refused): the pool probes it."""
        return self.error is not None and self.error.transient

    def is_failing(self) -> bool:
        """A connect failed and no session opened since (FAILING, DOWN or REFUSED)."""
        return self.error is not None or self.down_since is not None

    def up_gauge(self, session_open: bool) -> float:
        """``smtp_pool_relay_up``: 0 from the first failure while no session is open
        (an alert needs the outage while it lasts, not after the timeout), else 1."""
        return 0.0 if self.is_failing() and not session_open else 1.0

    # -- what happened --

    def connected(self) -> bool:
        """A session opened: UP. Returns True when the relay was DOWN or REFUSED before."""
        was_down = self.error is not None
        self.error = None
        self.down_since = None
        self.failures = 0
        return was_down

    def connect_failed(self, now: float, reason: str, *, code: int | None, session_open: bool
                       ) -> tuple[float, RelayError | None]:
        """A connect failed at ``now`` (``session_open``: another slot holds a session,
        so it is a blip, not an outage). Returns how long the slot waits before its
        next try, and the error when this failure declares the relay DOWN."""
        self.failures += 1
        if session_open:
            self.down_since = None
        elif self.down_since is None:
            self.down_since = now
        declared = None
        if self.down_since is not None and self.error is None:
            down_for = now - self.down_since
            if down_for >= self.down_timeout:
                self.error = declared = RelayError(
                    f"relay {self.relay} unreachable for {down_for:.0f} s: {reason}",
                    transient=True, relay=self.relay, code=code)
        delay = backoff_delay(self.failures, self.backoff_base, self.backoff_max, self._rng)
        if self.down_since is not None and self.error is None:
            delay = min(delay, max(0.0, self.down_since + self.down_timeout - now))  # declare it on time
        return max(delay, min(self.backoff_base, 0.05)), declared  # never a busy loop of connects

    def refused(self, reason: str, *, code: int | None) -> RelayError:
        """The relay refused the session for good: REFUSED (a first refusal is kept)."""
        if self.error is None or self.error.transient:
            self.error = RelayError(reason, transient=False, relay=self.relay, code=code)
        return self.error
