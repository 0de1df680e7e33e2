"""What a submit ends with: a SendResult, or an error of the PoolError tree."""

from __future__ import annotations

from dataclasses import dataclass

from pool.errors import ConnectionFailed, DeliveryError, PoolClosedError, PoolError, Refusals, RelayError

__all__ = ["ConnectionFailed", "DeliveryError", "PoolClosedError", "PoolError", "Refusals", "RelayError",
           "SendResult"]


@dataclass(frozen=True, slots=True)
class SendResult:
    """The server accepted the message for at least one recipient."""

    message_id: str | None
    accepted: list[str]
    refused: Refusals
    code: int
    response: str
    attempts: int
    elapsed: float
    relay: str | None = None  # the relay's name under SMTPRouter
