"""VERP: an envelope sender per job (``jobs.return_path``), so that a bounce names its job.

``bounces+{{ id }}@example.org`` sends job ``a7`` from ``bounces+a7@example.org``; a
bounce comes back to that address, whatever the receiving system writes in it. A job id
may hold characters an address cannot: everything but letters, digits, ``-`` and ``_``
is written ``=XX`` (each UTF-8 byte in hex), which reads back exactly."""

from __future__ import annotations

import re

from pool.envelope import xtext

_PLACEHOLDER = re.compile(r"\{\{\s*id\s*\}\}")
_KEEP = re.compile(r"[A-Za-z0-9_-]")
_ESCAPE = re.compile(r"=([0-9A-Fa-f]{2})")
_LOCAL_SAFE = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]*")


def encode(job_id: str) -> str:
    return "".join(c if _KEEP.fullmatch(c) else "".join(f"={b:02X}" for b in c.encode("utf-8")) for c in job_id)


def decode(text: str) -> str | None:
    """The job id ``encode`` wrote as ``text``; None when ``text`` is not one."""
    if _ESCAPE.sub("", text).count("=") or not re.fullmatch(r"[A-Za-z0-9_=-]*", text):
        return None
    try:
        return bytes(_unescape(text)).decode("utf-8")
    except UnicodeDecodeError:
        return None


def _unescape(text: str) -> bytearray:
    out = bytearray()
    i = 0
    while i < len(text):
        if text[i] == "=":
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out += text[i].encode("ascii")
            i += 1
    return out


def envelope_id_for(job_id: str) -> str | None:
    """The DSN ENVID a job is sent with: its id, when RFC 3461 allows it (printable
    ASCII, at most 100 characters as xtext); None otherwise (VERP and the returned
    Message-ID still name the job)."""
    if not job_id.isascii() or not job_id.isprintable() or len(xtext(job_id)) > 100:
        return None
    return job_id


class ReturnPath:
    """``jobs.return_path``: an address template with ``{{ id }}`` once, in the local part."""

    def __init__(self, template: str) -> None:
        """Raises ValueError naming ``jobs.return_path``."""
        parts = _PLACEHOLDER.split(template.strip())
        if len(parts) != 2:
            raise ValueError("jobs.return_path: must hold {{ id }} once (bounces+{{ id }}@example.org)")
        self.prefix, self.suffix = parts
        local_rest, at, domain = self.suffix.partition("@")
        if not at or "@" in self.prefix or "@" in domain or not domain or "." not in domain:
            raise ValueError("jobs.return_path: {{ id }} must be in the local part of an address "
                             "(bounces+{{ id }}@example.org)")
        if not _LOCAL_SAFE.fullmatch(self.prefix + local_rest) or not re.fullmatch(r"[A-Za-z0-9.-]+", domain):
            raise ValueError("jobs.return_path: not a plain address around {{ id }}")
        self.template = template

    def __repr__(self) -> str:
        return f"ReturnPath({self.template!r})"

    def render(self, job_id: str) -> str:
        return f"{self.prefix}{encode(job_id)}{self.suffix}"

    def job_id(self, address: str) -> str | None:
        """The job a bounce sent to ``address`` belongs to, or None (not one of ours)."""
        address = address.strip().strip("<>")
        low, prefix, suffix = address.lower(), self.prefix.lower(), self.suffix.lower()
        if len(address) <= len(prefix) + len(suffix) or not low.startswith(prefix) or not low.endswith(suffix):
            return None
        return decode(address[len(self.prefix):len(address) - len(self.suffix)])
