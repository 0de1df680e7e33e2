"""Unsubscribe tokens: who to unsubscribe, signed with ``unsubscribe.secret``.

A token carries the job id and the recipient in the clear (base64url) and an HMAC-SHA256
over both, so that the unsubscribe server needs no database of sent messages to know
who clicked, and nobody can unsubscribe an address by making up a URL. The token is the
last path segment of the URL (``https://example.org/u/{{ token }}``)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from email.utils import parseaddr

_MAC_BYTES = 16  # 128 bits: forging one is out of reach, and the URL stays short
_CONTEXT = b"smtp-dispatcher unsubscribe v1\x00"


class BadToken(ValueError):
    """The token was not made with this secret, or was altered."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: bytes) -> bytes:
    return hmac.new(secret.encode("utf-8"), _CONTEXT + payload, hashlib.sha256).digest()[:_MAC_BYTES]


def make_token(secret: str, job_id: str, recipient: str) -> str:
    """The token for ``recipient`` of job ``job_id``: URL-safe (``[A-Za-z0-9_-.]``)."""
    payload = json.dumps([job_id, recipient], ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    return _b64(payload) + "." + _b64(_mac(secret, payload))


def read_token(secret: str, token: str) -> tuple[str, str]:
    """(job id, recipient) of a token made with ``secret``; BadToken otherwise. The MAC
    is compared in constant time (``hmac.compare_digest``)."""
    body, dot, mac = token.partition(".")
    if not dot or len(token) > 4096:
        raise BadToken("malformed token")
    try:
        payload, given = _unb64(body), _unb64(mac)
    except (binascii.Error, ValueError):
        raise BadToken("malformed token") from None
    if not hmac.compare_digest(_mac(secret, payload), given):
        raise BadToken("forged or altered token")
    try:
        job_id, recipient = json.loads(payload)
    except (ValueError, TypeError):  # signed by us, so only a changed format lands here
        raise BadToken("malformed token") from None
    if not isinstance(job_id, str) or not isinstance(recipient, str):
        raise BadToken("malformed token")
    return job_id, recipient


def first_recipient(to: object) -> str | None:
    """The bare address of a job's first ``to`` (the one a token names)."""
    first = to[0] if isinstance(to, (list, tuple)) and to else to
    if not isinstance(first, str):
        return None
    address = parseaddr(first)[1]
    return address or None
