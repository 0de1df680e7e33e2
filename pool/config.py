"""The pool's own configuration sections (docs/configuration.md): ``smtp``, ``pool``, ``retry``.

They live here, not in ``dispatcher``, so that ``SMTPPool.from_settings`` needs nothing
but the library; ``dispatcher.config.Settings`` composes them with its own sections.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator

from pool.tls import check_ca_file

if TYPE_CHECKING:
    from pool.oauth import OAuth2


class Section(BaseModel):
    """A configuration section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class OAuth2Settings(Section):
    """``smtp.oauth2``: log in with an OAuth 2.0 access token (``pool.oauth.OAuth2``)."""

    token_command: str | None = None  # run without a shell; its standard output is the token
    token_file: Path | None = None  # holds the token; read again when it is due
    mechanism: Literal["xoauth2", "oauthbearer"] = "xoauth2"
    lifetime: float = Field(3600.0, gt=0)  # seconds a token lasts when its source does not say
    refresh_before: float = Field(300.0, ge=0)  # fetch a new token this long before it expires
    timeout: float = Field(30.0, gt=0)  # seconds the token command may take

    @model_validator(mode="after")
    def _one_source(self) -> OAuth2Settings:
        if (self.token_command is None) == (self.token_file is None):
            raise ValueError("give exactly one of token_command and token_file")
        return self


class SMTPSettings(Section):
    hostname: str
    port: int = Field(25, ge=1, le=65535)
    use_tls: bool = False
    start_tls: bool | None = None
    validate_certs: bool = True
    ca_file: Path | None = None
    username: str | None = None
    password: SecretStr | None = None
    timeout: float = Field(30.0, gt=0)
    relay_down_timeout: float = Field(300.0, gt=0)
    oauth2: OAuth2Settings | None = None  # instead of password

    @model_validator(mode="after")
    def _oauth2_login(self) -> SMTPSettings:
        if self.oauth2 is not None and (self.username is None or self.password is not None):
            raise ValueError("oauth2 needs username (the mailbox it logs in as) and no password")
        return self

    @field_validator("ca_file")
    @classmethod
    def _loadable(cls, value: Path | None) -> Path | None:
        if value is not None:
            check_ca_file(str(value))  # a typo is a config error now, not a relay "down" for 300 s
        return value


class PoolSettings(Section):
    size: int = Field(4, ge=1, le=1000)
    max_messages_per_connection: int | None = Field(None, ge=1)
    idle_timeout: float | None = Field(60.0, gt=0)
    rate_limit: float | None = Field(None, gt=0)
    queue_size: int = Field(1000, ge=1)
    max_bytes_in_flight: int = Field(256 << 20, ge=1)  # message bytes submitted and not yet ended
    pipelining: bool | None = None
    pipeline_depth: int = Field(8, ge=1, le=1000)


class RetrySettings(Section):
    max_attempts: int = Field(5, ge=1)
    backoff_base: float = Field(0.5, ge=0)
    backoff_max: float = Field(60.0, ge=0)


def oauth2_login(settings: OAuth2Settings) -> OAuth2:
    """The ``OAuth2`` login of an ``smtp.oauth2`` section."""
    from pool.oauth import OAuth2

    return OAuth2(command=settings.token_command, file=settings.token_file, mechanism=settings.mechanism,
                  lifetime=settings.lifetime, refresh_before=settings.refresh_before, timeout=settings.timeout)
