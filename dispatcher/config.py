"""The YAML configuration (docs/configuration.md): pydantic models, ``${VAR}`` expansion."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from dispatcher.compose.templates import TemplatesSettings, UnsubscribeSettings
from dispatcher.loop.settings import BouncesSettings, SuppressionSettings
from pool.config import PoolSettings, RetrySettings, Section, SMTPSettings
from pool.dkim import DKIMSettings


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key path."""


class _Section(Section):
    pass


class MetricsSettings(_Section):
    port: int | None = Field(default=None, ge=0, le=65535)
    address: str = Field(default="0.0.0.0", min_length=1)  # of /metrics; all interfaces, like node_exporter
    textfile: Path | None = None


class JobsSettings(_Section):
    attachments_root: Path | None = None  # attachment paths must resolve inside it [the jobs file's directory]
    default_from: str | None = None  # the From of a job that gives none (templates, docs/campaigns.md)
    # The envelope sender of composed and templated jobs, per job (VERP): bounces+{{ id }}@example.org
    return_path: str | None = None
    # Added to every composed and templated message unless the job sets the same name
    # (Feedback-ID for Gmail's feedback loop, List-Id); signed when DKIM is on.
    headers: dict[str, str] = Field(default_factory=dict)
    # Processes composing (and signing) the lines of a jobs file for `dispatcher run`
    # [one per core when DKIM is on, else one]; a pipe or one core composes in-process.
    compose_processes: int | None = Field(default=None, ge=1, le=64)

    @field_validator("headers")
    @classmethod
    def _headers(cls, value: dict[str, str]) -> dict[str, str]:
        from dispatcher.compose.jobs import check_custom_headers

        check_custom_headers(value)
        return value

    @field_validator("return_path")
    @classmethod
    def _return_path(cls, value: str | None) -> str | None:
        if value is not None:
            from dispatcher.loop.verp import ReturnPath

            try:
                ReturnPath(value)
            except ValueError as exc:
                raise ValueError(str(exc).removeprefix("jobs.return_path: ")) from None
        return value


class LoggingSettings(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class RedisSettings(_Section):
    """``dispatcher enqueue/worker/status/results`` (docs/redis.md). ``url`` may hold a
    password: use ``${VAR}``; it is never printed."""

    url: str | None = None  # redis://[:password@]host:6379/0; --redis overrides
    stream: str = Field(default="dispatcher:jobs", min_length=1)
    group: str = Field(default="dispatcher", min_length=1)
    # seconds; None: smtp.timeout x max_attempts + backoff_max + 30
    claim_after: float | None = Field(default=None, gt=0)
    max_deliveries: int = Field(default=5, ge=1)


class RelaySettings(SMTPSettings):
    """One entry of ``relays:`` (docs/configuration.md): an ``smtp`` section with a ``name``
    (results, logs and the metrics' ``relay`` label), a ``weight`` (its share of the
    messages) and its own ``pool`` keys; the keys it leaves out come from the top-level
    ``pool`` section."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    weight: float = Field(default=1.0, gt=0)
    pool: PoolSettings = Field(default_factory=lambda: PoolSettings.model_validate({}))


class Settings(_Section):
    smtp: SMTPSettings | None = None
    relays: list[RelaySettings] | None = Field(default=None, min_length=1)  # instead of smtp: several relays
    pool: PoolSettings = PoolSettings.model_validate({})
    retry: RetrySettings = RetrySettings.model_validate({})
    jobs: JobsSettings = JobsSettings()
    metrics: MetricsSettings = MetricsSettings()
    logging: LoggingSettings = LoggingSettings()
    redis: RedisSettings = RedisSettings()
    templates: TemplatesSettings = TemplatesSettings()  # docs/campaigns.md (dispatcher.compose.stage)
    unsubscribe: UnsubscribeSettings = UnsubscribeSettings()
    dkim: DKIMSettings | list[DKIMSettings] | None = None  # one key, or several (each signs: rsa and ed25519)
    suppression: SuppressionSettings = SuppressionSettings()  # the suppression list (dispatcher.loop)
    bounces: BouncesSettings = BouncesSettings()  # dispatcher bounces

    @field_validator("relays")
    @classmethod
    def _relays_or_smtp(cls, relays: list[RelaySettings] | None, info: ValidationInfo) -> list[RelaySettings] | None:
        if relays is None:
            return None
        if info.data.get("smtp") is not None:
            raise PydanticCustomError(
                "smtp_and_relays", "smtp and relays are both set; keep one (relays: a list of smtp sections, "
                "each with a name)")
        seen: set[str] = set()
        for relay in relays:
            if relay.name in seen:
                raise PydanticCustomError("duplicate_relay", "two relays are named {name}; names must differ",
                                          {"name": repr(relay.name)})
            seen.add(relay.name)
        return relays

    @model_validator(mode="after")
    def _relay_pools(self) -> Settings:
        """A relay's own ``pool`` keys over the top-level ones. Stored resolved, so
        validating a dump of these settings again gives the same pools."""
        for relay in self.relays or ():
            own = relay.pool.model_dump(exclude_unset=True)
            relay.pool = PoolSettings.model_validate({**self.pool.model_dump(), **own})
        return self


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
        message = "unknown key" if item["type"] == "extra_forbidden" else item["msg"].removeprefix("Value error, ")
        lines.append(f"{path}: {message}" if path else message)
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
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        line = exc.object[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not UTF-8 text (line {line}, byte {exc.start + 1} of the file)") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_problem(exc)}") from None
    return parse_settings(document, str(path))


_QUOTED = re.compile(r"'(?:[^'\\]|\\.)*'|\"(?:[^\"\\]|\\.)*\"")


_TOKEN = re.compile(r"'<[a-z ]+>'")


def _yaml_problem(error: yaml.YAMLError) -> str:
    """Where and what, never the file's text: PyYAML's message quotes the offending
    line, and its problem may quote a token (``password: *secret`` is an alias)."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or "syntax error"
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    # Token names ('<scalar>', '<block end>') are kept; any other quoted text is not.
    return where + _QUOTED.sub(lambda m: m[0] if _TOKEN.fullmatch(m[0]) else "(text omitted)", str(problem))


def with_pool_overrides(settings: Settings, **keys: Any) -> Settings:
    """``settings`` with ``keys`` (command-line flags: size, rate_limit) set in the
    ``pool`` section and in every relay's: flags override the whole file."""
    keys = {key: value for key, value in keys.items() if value is not None}
    relays = [relay.model_copy(update={"pool": relay.pool.model_copy(update=keys)}) for relay in settings.relays or ()]
    return settings.model_copy(update={"pool": settings.pool.model_copy(update=keys), "relays": relays or None})
