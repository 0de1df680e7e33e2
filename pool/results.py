"""What a submit ends with: a SendResult, or a DeliveryError from the PoolError tree."""

from __future__ import annotations

from dataclasses import dataclass

#: recipient -> (SMTP code, server text)
Refusals = dict[str, tuple[int, str]]


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


class PoolError(Exception):
    """Base of every error the pool raises about a message or itself."""


class PoolClosedError(PoolError):
    """The pool is closed (or closing without drain) and will not send this message."""


class DeliveryError(PoolError):
    """The message was delivered to no recipient.

    ``permanent`` is True when the server's answer was a 5xx (or every recipient was
    refused permanently); False when transient failures outlasted ``max_attempts``.
    """

    def __init__(
        self,
        message: str,
        *,
        code: int | None,
        response: str,
        permanent: bool,
        attempts: int,
        refused: Refusals | None = None,
        message_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.response = response
        self.permanent = permanent
        self.attempts = attempts
        self.refused: Refusals = dict(refused or {})
        self.message_id = message_id

    def __repr__(self) -> str:
        return (
            f"DeliveryError(code={self.code!r}, response={self.response!r}, "
            f"permanent={self.permanent}, attempts={self.attempts}, refused={self.refused!r})"
        )


class ConnectionFailed(Exception):
    """Internal: the session is unusable (disconnect, timeout, 421, failed connect).

    ``ambiguous`` is True when the end of DATA was sent and its reply never came:
    the server may have accepted the message. Never reaches the pool's callers.
    """

    def __init__(self, reason: str, *, code: int | None = None, ambiguous: bool = False) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.ambiguous = ambiguous
