"""The YAML configuration (SPEC section 3): pydantic models, ``${VAR}`` expansion."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError

from pool.config import PoolSettings, RetrySettings, Section, SMTPSettings
from pool.config import pool_kwargs as _pool_kwargs


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key path."""


class _Section(Section):
    pass


class MetricsSettings(_Section):
    port: int | None = Field(None, ge=0, le=65535)
    textfile: Path | None = None


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class Settings(_Section):
    smtp: SMTPSettings | None = None
    pool: PoolSettings = PoolSettings()
    retry: RetrySettings = RetrySettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand(node: Any, path: str) -> Any:
    """Replace ``${VAR}`` in every string with the environment's value."""
    if isinstance(node, dict):
        return {key: _expand(value, f"{path}.{key}" if path else str(key)) for key, value in node.items()}
    if isinstance(node, list):
        return [_expand(value, f"{path}.{i}") for i, value in enumerate(node)]
    if isinstance(node, str):

        def lookup(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in os.environ:
                raise ConfigError(f"{path}: environment variable {name} is not set")
            return os.environ[name]

        return _VAR.sub(lookup, node)
    return node


def describe_errors(error: ValidationError) -> str:
    """``key.path: message`` for each error, never the offending value (it may be a secret)."""
    lines = []
    for item in error.errors():
        path = ".".join(str(part) for part in item["loc"])
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"]
        lines.append(f"{path}: {message}")
    return "; ".join(lines)


def parse_settings(document: Any, source: str = "config") -> Settings:
    if document is None:
        document = {}
    if not isinstance(document, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        return Settings.model_validate(_expand(document, ""))
    except ValidationError as exc:
        # pydantic never echoes SecretStr input, and we print only locations and messages.
        raise ConfigError(f"{source}: {describe_errors(exc)}") from None


def load_settings(path: str | Path) -> Settings:
    """Read and validate a YAML file. Raises ConfigError naming the file and key path."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    return parse_settings(document, str(path))


def pool_kwargs(settings: Settings) -> dict[str, Any]:
    """SMTPPool keyword arguments for ``settings`` (its ``smtp`` section must be set)."""
    if settings.smtp is None:
        raise ConfigError("smtp: no relay configured")
    return _pool_kwargs(settings.smtp, settings.pool, settings.retry)
