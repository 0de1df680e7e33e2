"""One row of results, built one way for the results file (``run``) and the results
stream (``worker``): ``{"id", "line", "status", "attempts", "code", "response",
"refused", "suppressed", "error", "elapsed_ms", "message_id"}``, plus ``recipients``
(a ``--retry-failed`` row speaks for these only) and ``relay`` (its name under
``relays:``) when they apply."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

UNSENT = "unsent"  # never on the wire (stopping, pool closed, relay down): no row; the stream hands it back


@dataclass(slots=True)  # not frozen: one per job, and a frozen init costs twice as much
class Outcome:
    """How one job ended, as the engine hands it to the ledger: ``status`` (``sent``,
    ``failed``, ``invalid``, ``suppressed``, ``skipped`` or ``unsent``) and the fields
    of its row (``result_row``'s keywords). ``transient``: a failure another try may
    cure (4xx, lost connection), which the stream gives another delivery. ``earlier``:
    a ``skipped`` job was finished before (not only left with nothing to retry)."""

    status: str
    fields: dict[str, Any] = field(default_factory=dict)
    transient: bool = False
    earlier: bool = True


SKIPPED = Outcome("skipped")
NOTHING_TO_RETRY = Outcome("skipped", earlier=False)
NOT_SENT = Outcome(UNSENT)


def result_row(
    job_id: str | None,
    line: int,
    status: str,
    *,
    attempts: int = 0,
    code: int | None = None,
    response: str | None = None,
    refused: Mapping[str, tuple[int, str]] | None = None,
    suppressed: Sequence[str] = (),
    error: str | None = None,
    elapsed_ms: float = 0,
    message_id: str | None = None,
    recipients: Sequence[str] | None = None,
    relay: str | None = None,
) -> dict[str, Any]:
    """The row for one finished job. ``refused`` maps a recipient to the server's
    (code, text); text that is not UTF-8 (a reply byte decoded with surrogateescape)
    is kept with replacement characters, whatever the server sent."""
    row: dict[str, Any] = {
        "id": job_id, "line": line, "status": status, "attempts": attempts, "code": code,
        "response": text(response),
        "refused": {rcpt: [c, text(t)] for rcpt, (c, t) in (refused or {}).items()},
        "suppressed": list(suppressed), "error": text(error), "elapsed_ms": elapsed_ms,
        "message_id": message_id,  # what the message was sent with (None: not sent)
    }
    if recipients is not None:
        row["recipients"] = list(recipients)
    if relay is not None:
        row["relay"] = relay
    return row


def text(value: Any) -> Any:
    """Text for a results row: a lone surrogate becomes U+FFFD."""
    if not isinstance(value, str):
        return value
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return value.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return value
