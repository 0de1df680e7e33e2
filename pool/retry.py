"""Classifying SMTP replies and errors, and backoff with full jitter. Pure functions."""

from __future__ import annotations

import random

#: RFC 5321 section 4.2.1: 4yz is a transient negative completion, 5yz a permanent one.
PERMANENT_MIN, PERMANENT_MAX = 500, 599
TRANSIENT_MIN, TRANSIENT_MAX = 400, 499

#: 421: the server is closing the transmission channel (RFC 5321 section 3.8).
SERVICE_CLOSING = 421


def is_positive(code: int) -> bool:
    return 200 <= code < 400


def is_permanent(code: int | None) -> bool:
    """A 5xx reply: retrying the same transaction will not succeed."""
    return code is not None and PERMANENT_MIN <= code <= PERMANENT_MAX


def is_transient(code: int | None) -> bool:
    """A 4xx reply, or no reply at all (``None``: connection lost, timeout)."""
    return code is None or TRANSIENT_MIN <= code <= TRANSIENT_MAX


def backoff_delay(
    retry: int, base: float, cap: float, rng: random.Random | None = None
) -> float:
    """Seconds to wait before retry number ``retry`` (1-based): full jitter.

    ``uniform(0, min(cap, base * 2 ** (retry - 1)))`` — AWS Architecture Blog,
    "Exponential Backoff And Jitter": spreads retries of many senders evenly.
    """
    if retry < 1:
        raise ValueError("retry is 1-based")
    ceiling = min(cap, base * (2 ** min(retry - 1, 62)))
    return (rng or random).uniform(0.0, ceiling)


#: Texts of transient replies that mean "slow down" (docs/library.md promise 12). Collected from
#: providers: SES "454 Throttling failure: Maximum sending rate exceeded", Gmail
#: "421 4.7.0 ... unusual rate", "450 4.2.1 ... receiving mail at a rate", Outlook
#: "451 4.7.500 Server busy", Postfix "421 4.7.0 Error: too many connections", SendGrid
#: "421 ... Too many concurrent connections", Mailgun "421 ... rate limit exceeded".
_THROTTLE_WORDS = ("rate", "throttl", "too many", "limit")
_THROTTLE_CODES = frozenset({421, 450, 451, 454})


def is_throttling(code: int, text: str) -> bool:
    """A transient reply asking the client to slow down: enhanced status 4.7.x, or
    421/450/451/454 whose text speaks of a rate, throttling, too many or a limit."""
    if not TRANSIENT_MIN <= code <= TRANSIENT_MAX:
        return False
    if text.startswith("4.7."):
        return True
    if code in _THROTTLE_CODES:
        lowered = text.lower()
        return any(word in lowered for word in _THROTTLE_WORDS)
    return False


def readable(text: str) -> str:
    """A server reply's text as valid Unicode: bytes that were not UTF-8 (decoded with
    surrogateescape by aiosmtplib) become U+FFFD, so the text can be logged, encoded
    and recorded anywhere (docs/library.md promise 13)."""
    if text.isascii():
        return text
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
