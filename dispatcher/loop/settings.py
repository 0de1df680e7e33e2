"""The configuration sections of the loop: ``suppression``, ``bounces`` and ``unsubscribe.server``."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, SecretStr

from pool.config import Section


class SuppressionSettings(Section):
    """The ``suppression`` section."""

    path: Path = Path("suppressions.sqlite")  # the SQLite store, created when first written
    redis: bool = False  # the workers' Redis (redis.url) holds the list instead, shared by every machine
    redis_key: str = Field(default="dispatcher:suppressions", min_length=1)  # the hash, with redis: true
    auto: bool = True  # a recipient refused with 5.1.x or 5.2.1 at send time is suppressed
    refresh: float = Field(default=2.0, gt=0)  # seconds between checks for changes by other processes


class BouncesSettings(Section):
    """The ``bounces`` section (``dispatcher bounces``)."""

    imap_password: SecretStr | None = None  # for imaps:// sources; use ${VAR}
    imap_timeout: float = Field(default=30.0, gt=0)  # seconds per IMAP command
    ca_file: Path | None = None  # CA certificates to trust for the IMAP server (a private CA)


class UnsubscribeServerSettings(Section):
    """``unsubscribe.server``: where ``dispatcher unsubscribe-server`` listens."""

    host: str = "127.0.0.1"  # behind a TLS reverse proxy
    port: int = Field(default=8025, ge=0, le=65535)
