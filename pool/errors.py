"""The errors the pool raises: one base, ``PoolError``, and what each failure carries."""

from __future__ import annotations

#: recipient -> (SMTP code, server text)
Refusals = dict[str, tuple[int, str]]


class PoolError(Exception):
    """Base of every error the pool raises about a message or itself."""


class PoolClosedError(PoolError):
    """The pool is closed (or closing without drain) and will not send this message."""


class Withdrawn(PoolError):
    """The submitter's ``admit()`` said no as the message was about to go on the wire
    (its lease on the job had lapsed, for instance): it was not sent."""


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
        relay: str | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.response = response
        self.permanent = permanent
        self.attempts = attempts
        self.refused: Refusals = dict(refused or {})
        self.message_id = message_id
        self.relay = relay  # the relay that refused it, under SMTPRouter

    def through(self, relay: str, earlier: Refusals | None = None) -> DeliveryError:
        """This error as ``SMTPRouter`` raises it: naming ``relay``, with the recipients
        refused for good by relays tried ``earlier`` among its ``refused``."""
        return DeliveryError(str(self), code=self.code, response=self.response, permanent=self.permanent,
                             attempts=self.attempts, refused={**(earlier or {}), **self.refused},
                             message_id=self.message_id, relay=relay)

    def __repr__(self) -> str:
        return (
            f"DeliveryError(code={self.code!r}, response={self.response!r}, "
            f"permanent={self.permanent}, attempts={self.attempts}, refused={self.refused!r})"
        )


class RelayError(PoolError):
    """The relay, not the message, is the problem (docs/library.md promise 10).

    ``transient=True``: no session could be opened for ``relay_down_timeout`` seconds;
    the message was not sent and may be submitted again later. ``transient=False``: a
    permanent session failure (AUTH refused, certificate not trusted, STARTTLS missing
    while a password is set); nothing will be sent until the configuration changes.
    ``relay`` names the relay (``host:port``), ``code`` the SMTP reply when there was one.
    """

    def __init__(self, message: str, *, transient: bool, relay: str, code: int | None = None,
                 refused: Refusals | None = None, recipients: tuple[str, ...] = (),
                 maybe_delivered: bool = False) -> None:
        super().__init__(message)
        self.transient = transient
        self.relay = relay
        self.code = code
        # On the error a submit raises: recipients refused for good before the relay
        # failed, those still to send, and whether an attempt was lost after its end of
        # DATA (the relay may have the message: at-least-once).
        self.refused: Refusals = dict(refused or {})
        self.recipients = recipients
        self.maybe_delivered = maybe_delivered

    def __repr__(self) -> str:
        return f"RelayError({str(self)!r}, transient={self.transient}, relay={self.relay!r}, code={self.code!r})"


class ConnectionFailed(Exception):
    """Internal: the session is unusable (disconnect, timeout, 421, failed connect).

    ``ambiguous`` is True when the end of DATA was sent and its reply never came:
    the server may have accepted the message. Never reaches the pool's callers.
    On a pipelined session, ``replies`` are those that came for the failed group of
    commands and ``written`` says whether the group had been handed to the socket.
    """

    def __init__(self, reason: str, *, code: int | None = None, ambiguous: bool = False,
                 text: str | None = None, replies: list[tuple[int, str]] | None = None,
                 written: bool = True) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.ambiguous = ambiguous
        self.text = text  # the server's reply text after ``code``, when a reply ended the session
        self.replies = replies if replies is not None else []
        self.written = written


class SessionRefused(Exception):
    """Internal: the relay refused the session for good (AUTH rejected, certificate not
    trusted, STARTTLS missing while a password is set). Becomes a RelayError."""

    def __init__(self, reason: str, *, code: int | None = None) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
