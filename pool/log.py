"""The pool's event log: structlog when the application configured it, else the
standard ``logging`` module (logger ``pool``), so a program that configured nothing
sees nothing on its standard output. Logging never breaks delivery: an error while
writing an event (say, a closed pipe) is dropped, as ``logging`` itself does."""

from __future__ import annotations

import logging
from typing import Any

import structlog

_stdlib = logging.getLogger("pool")
# As the logging HOWTO asks of a library: with no handler configured anywhere, nothing
# is printed (not even warnings through logging's last-resort handler on stderr).
_stdlib.addHandler(logging.NullHandler())


class EventLogger:
    __slots__ = ("_context",)

    def __init__(self, **context: Any) -> None:
        self._context = context

    def bind(self, **context: Any) -> EventLogger:
        return EventLogger(**{**self._context, **context})

    def _log(self, level: int, event: str, fields: dict[str, Any]) -> None:
        try:
            if structlog.is_configured():
                structlog.get_logger("pool").log(level, event, **self._context, **fields)
            elif _stdlib.isEnabledFor(level):
                pairs = " ".join(f"{k}={v!r}" for k, v in {**self._context, **fields}.items())
                _stdlib.log(level, "%s %s", event, pairs, exc_info=fields.get("exc_info"))
        except Exception:  # noqa: BLE001, S110 - a log line is never worth a message
            pass

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)


log = EventLogger()
