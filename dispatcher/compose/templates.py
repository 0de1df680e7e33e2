"""Templated jobs and unsubscribe headers (docs/campaigns.md).

``Templates(dir).render(name, context)`` renders ``NAME.subject``, ``NAME.text`` and
``NAME.html`` with Jinja2 in a sandbox (``ImmutableSandboxedEnvironment``): undefined
variables are errors (StrictUndefined), only ``.html`` is autoescaped, every file is
loaded and compiled once per ``Templates`` and cached (a missing file or a syntax
error too). Failures raise ``TemplateError`` whose ``field`` is ``template`` or
``data.KEY``, with the template's file and line in the message.

``Templates.compose(job)`` turns a ``TemplatedJob`` into a composed-job document (a
dict for ``dispatcher.compose.jobs.ComposedJob``); ``Unsubscribe`` renders the
``List-Unsubscribe`` headers per job. This module does not import ``dispatcher.compose.jobs``,
so ``jobs`` may import it.
"""

from __future__ import annotations

import functools
import re
import threading
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import jinja2
import structlog
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import new_context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import missing
from jinja2.visitor import NodeTransformer
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from dispatcher.loop.settings import UnsubscribeServerSettings
from dispatcher.loop.tokens import first_recipient, make_token
from pool.config import Section

Part = Literal["subject", "text", "html"]
PARTS: tuple[Part, ...] = ("subject", "text", "html")

_TEMPLATE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*(?:/[A-Za-z0-9_][A-Za-z0-9_.-]*)*")
_MAX_SEQUENCE = 1_000_000  # longest string or list ``*`` may build in a template
DEFAULT_TIMEOUT = 2.0  # seconds of CPU to render one job's templates (templates.timeout)
DEFAULT_MAX_BYTES = 10 * 1024 * 1024  # the most one rendered part may hold (templates.max_bytes)
_MAX_EXPONENT = 1_000


class TemplateError(ValueError):
    """A template cannot be rendered for a job. ``field`` is ``template`` (missing
    file, syntax error, forbidden operation) or ``data.KEY`` (undefined variable)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


#: Fields of a job error that name a setting, not a field of the job: every job would
#: fail alike, so ``run`` and ``worker`` stop (exit 2, nothing recorded) instead.
SETTINGS_FIELDS = frozenset({"templates.dir"})


@dataclass(frozen=True, slots=True)
class Rendered:
    """A template's parts for one job; None where the file does not exist or the
    part was not asked for."""

    subject: str | None
    text: str | None
    html: str | None


# -- configuration ----------------------------------------------------------------


class TemplatesSettings(Section):
    """The ``templates`` section. ``dir`` is relative to the current directory;
    rendering one job stops after ``timeout`` seconds of CPU or ``max_bytes`` of output
    (the job is then invalid)."""

    dir: Path = Path("templates")
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0, le=3600)
    max_bytes: int = Field(default=DEFAULT_MAX_BYTES, gt=0)


class UnsubscribeSettings(Section):
    """The ``unsubscribe`` section: ``url`` is an http(s) URL template
    (``https://example.org/u/{{ id }}``), ``mailto`` an address or ``mailto:`` URI,
    which may also use template variables."""

    url: str | None = None
    mailto: str | None = None
    # Signs {{ token }} in url (the job id and recipient, checked by dispatcher unsubscribe-server).
    secret: SecretStr | None = Field(default=None, min_length=16)
    server: UnsubscribeServerSettings = UnsubscribeServerSettings()

    @field_validator("url")
    @classmethod
    def _url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not re.match(r"(?i)^(https?://|\{\{)", value):
            raise ValueError("must be an https:// URL (a template: https://example.org/u/{{ id }})")
        _check_syntax(value)
        return value

    @field_validator("mailto")
    @classmethod
    def _mailto(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if "@" not in value and "{{" not in value:
            raise ValueError("must be an email address or a mailto: URI")
        _check_syntax(value)
        return value


def _check_syntax(source: str) -> None:
    try:
        _environment().parse(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"not a valid template: {exc.message}") from None


# -- jobs -------------------------------------------------------------------------


class TemplatedJob(BaseModel):
    """``{"id", "template", "to", "data"?}`` plus any field of a composed job, which
    wins over the template's part of the same name (subject, text, html).

    Only shapes are checked here; ``Templates.compose`` returns a composed-job
    document that ``ComposedJob`` validates in full (addresses, header injection,
    attachments), with the same field names.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    id: str
    template: str
    to: list[str] = Field(min_length=1)
    data: dict[str, Any] = Field(default_factory=dict)
    from_: str | None = Field(None, alias="from")
    cc: list[str] | None = None
    bcc: list[str] | None = None
    reply_to: str | None = None
    subject: str | None = None
    text: str | None = None
    html: str | None = None
    headers: dict[str, str] | None = None
    attachments: list[dict[str, Any]] | None = None

    @field_validator("template")
    @classmethod
    def _name(cls, value: str) -> str:
        if len(value) > 255 or not _TEMPLATE_NAME.fullmatch(value):
            raise ValueError(f"{value[:60]!r} is not a template name (letters, digits, '_', '-', '.', "
                             "'/' between names)")
        return value

    def fields(self) -> dict[str, Any]:
        """The composed-job fields the line gave (``from`` by its JSON name)."""
        return self.model_dump(by_alias=True, exclude_none=True, exclude={"template", "data"})


def job_context(fields: Mapping[str, Any], data: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Template variables for a job: ``data``'s keys, ``data`` itself, then the job's
    own fields (``id``, ``to``, ``from``, ``cc``, ``subject``...), which win."""
    context: dict[str, Any] = dict(data) if data else {}
    context["data"] = data or {}
    for key, value in fields.items():
        if key not in ("text", "html", "attachments"):
            context[key] = value
    return context


# -- the environment --------------------------------------------------------------


class _UndefinedVariable(jinja2.UndefinedError):
    """An undefined variable, with what it was looked up on, to name ``data.KEY``."""

    def __init__(self, message: str | None = None, *, obj: Any = missing, name: Any = None) -> None:
        super().__init__(message)
        self.obj = obj
        self.name = name


class _Undefined(jinja2.StrictUndefined):
    """StrictUndefined whose error carries the variable's name and owner. Undefined
    values the sandbox makes for unsafe attributes keep their SecurityError."""

    __slots__ = ()

    def __init__(self, hint: str | None = None, obj: Any = missing, name: str | None = None,
                 exc: type[jinja2.exceptions.TemplateRuntimeError] = jinja2.UndefinedError) -> None:
        if exc is jinja2.UndefinedError and hint is None:
            exc = functools.partial(_UndefinedVariable, obj=obj, name=name)  # type: ignore[assignment]
        super().__init__(hint, obj, name, exc)


class _Runaway(SecurityError):
    """Rendering went past ``templates.timeout`` or ``templates.max_bytes``."""


class _Budget(threading.local):
    """What the render running on this thread may still spend: a deadline in this
    thread's CPU time and a size for any one value or the output."""

    deadline = float("inf")
    max_bytes = DEFAULT_MAX_BYTES
    timeout = DEFAULT_TIMEOUT


_budget = _Budget()
_CHECK_EVERY = 256  # loop iterations between two looks at the clock (~0.2 µs each)
_CHECK_CHUNKS = 32  # chunks of output between two looks (a one-line template makes a few)
_FORMAT_WIDTH = re.compile(r"%[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_time() -> None:
    if time.thread_time() > _budget.deadline:
        raise _Runaway(f"rendering took more than {_budget.timeout:g} s of CPU (templates.timeout)")


def _check_size(value: Any) -> Any:
    if isinstance(value, str | list | tuple | dict) and len(value) > _budget.max_bytes:
        raise _Runaway(f"a value of more than {_budget.max_bytes} bytes (templates.max_bytes)")
    return value


def _loop_guard(iterable: Any) -> Iterator[Any]:
    """Every ``{% for %}`` iterates through this (see ``_Guard``): a loop that outputs
    nothing is still stopped at the deadline."""
    for count, item in enumerate(iterable):
        if not count % _CHECK_EVERY:
            _check_time()
        yield item


def _concat_guard(value: Any) -> Any:
    """Every ``~`` goes through this: ``{% set x = x ~ x %}`` in a loop stops at
    ``max_bytes`` instead of doubling until memory runs out."""
    _check_time()
    return _check_size(value)


def _guarded_filter(function: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that refuses a width beyond ``max_bytes`` before it runs
    (``'x'|center(500000000)``) and a result beyond it after."""

    @functools.wraps(function)  # keeps jinja_pass_arg (pass_context, pass_environment)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        for value in (*args, *kwargs.values()):
            if isinstance(value, int) and not isinstance(value, bool) and value > _budget.max_bytes:
                raise _Runaway(f"a filter argument of {value} (templates.max_bytes is {_budget.max_bytes})")
        _check_time()
        return _check_size(function(*args, **kwargs))

    return guarded


class _Guard(NodeTransformer):
    """Rewrites a template's syntax tree so that every loop and every ``~`` is bounded."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        visited = self.generic_visit(node)
        assert isinstance(visited, nodes.For)
        visited.iter = nodes.Filter(visited.iter, "loop_guard_", [], [], None, None, lineno=node.lineno)
        return visited

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        visited = self.generic_visit(node)
        assert isinstance(visited, nodes.Expr)
        return nodes.Filter(visited, "concat_guard_", [], [], None, None, lineno=node.lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    """The sandbox, also bounding what a template may spend (docs/campaigns.md): ``*``,
    ``**``, ``+`` and ``%`` that would build a huge value (``{{ 'x' * 10**9 }}``) are
    refused, every loop, ``~``, filter and call looks at the CPU deadline, and every
    value is at most ``templates.max_bytes``. No template or data can stall the batch
    or exhaust memory."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _guarded_filter(function) for name, function in self.filters.items()}
        self.filters["loop_guard_"] = _loop_guard
        self.filters["concat_guard_"] = _concat_guard

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        guarded: nodes.Template = _Guard().visit(tree)
        return guarded

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        _check_time()
        for value in (*args, *kwargs.values()):  # 'x'.center(10**9), 'x'.zfill(10**9)
            if isinstance(value, int) and not isinstance(value, bool) and value > _budget.max_bytes:
                raise _Runaway(f"a call argument of {value} (templates.max_bytes is {_budget.max_bytes})")
        return _check_size(super().call(__context, __obj, *args, **kwargs))

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        if operator == "**" and isinstance(right, int) and abs(right) > _MAX_EXPONENT:
            raise SecurityError(f"exponent {right} is too large")
        if operator == "*":
            for seq, times in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(times, int) \
                        and len(seq) * times > _MAX_SEQUENCE:
                    raise SecurityError(f"repetition would make more than {_MAX_SEQUENCE} items")
        if operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple) \
                and len(left) + len(right) > _budget.max_bytes:
            raise _Runaway(f"a value of more than {_budget.max_bytes} bytes (templates.max_bytes)")
        if operator == "%" and isinstance(left, str):
            for width in _FORMAT_WIDTH.findall(left):
                if any(w == "*" or (w and int(w) > _budget.max_bytes) for w in width):
                    raise _Runaway("a format width beyond templates.max_bytes")
        _check_time()
        return _check_size(super().call_binop(context, operator, left, right))


def _finalize(value: Any) -> Any:
    return "" if value is None else value  # JSON null prints as nothing, not "None"


def _url_value(value: Any) -> Any:
    """What a URL template inserts, percent-encoded (RFC 3986): an id ``a b#c`` gives
    ``a%20b%23c``, so no value can end the path, add a query parameter or a fragment."""
    return quote(str(_finalize(value)), safe="")


def _environment(loader: jinja2.BaseLoader | None = None, finalize: Callable[[Any], Any] = _finalize) -> _Sandbox:
    return _Sandbox(
        loader=loader,
        undefined=_Undefined,
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "htm"), default_for_string=False,
                                            default=False),
        keep_trailing_newline=True,  # a text body keeps its last line break
        trim_blocks=True,  # a line holding only a {% tag %} leaves no blank line in text mail
        lstrip_blocks=True,
        auto_reload=False,  # never stat the files again: compiled once per run
        cache_size=-1,  # includes too stay compiled for the whole run
        finalize=finalize,
    )


def _render(template: jinja2.Template, variables: dict[str, Any], context: Mapping[str, Any],
            where: Callable[[], str], source_prefix: str | None, *, timeout: float = DEFAULT_TIMEOUT,
            max_bytes: int = DEFAULT_MAX_BYTES, deadline: float | None = None) -> str:
    """``template.render(context)`` without its two walks of a ChainMap of globals (8
    of its 10 µs for a one-line template): ``variables`` is the environment's globals
    and the context merged once per job and shared by its parts, which is safe since
    a template's ``{% set %}`` writes to its own Context, never to the parent.
    Stops after ``timeout`` seconds of this thread's CPU (or at ``deadline``, in
    ``time.thread_time()``, shared by a job's parts) or ``max_bytes`` of output."""
    env = template.environment
    if deadline is None:
        deadline = time.thread_time() + timeout
    _budget.deadline, _budget.timeout, _budget.max_bytes = deadline, timeout, max_bytes
    try:
        try:
            ctx = new_context(env, template.name, template.blocks, variables, True, env.globals, None)
            out: list[str] = []
            size = 0
            for chunk in template.root_render_func(ctx):
                out.append(chunk)
                size += len(chunk)
                if size > max_bytes:
                    raise _Runaway(f"rendered more than {max_bytes} bytes (templates.max_bytes)")
                if not len(out) % _CHECK_CHUNKS:  # loops, calls and operators check the clock themselves
                    _check_time()
            return env.concat(out)
        except Exception:  # noqa: BLE001 - a template expression can raise anything (1 / 0, int("x"))
            env.handle_exception()  # re-raises it with the template's file and line in the traceback
    except Exception as exc:  # noqa: BLE001 - as above
        raise _error(exc, context, where(), source_prefix) from None
    finally:
        _budget.deadline = float("inf")


def _error(exc: Exception, context: Mapping[str, Any], where: str, source_prefix: str | None) -> TemplateError:
    """Translate a Jinja2 failure while rendering into a TemplateError."""
    # Jinja2 rewrites the traceback so that a template's frames carry its file and line.
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if source_prefix is not None and f.filename.startswith(source_prefix)]
    if frames:
        where = f"{frames[-1].filename} line {frames[-1].lineno}"
    if isinstance(exc, _UndefinedVariable):
        key = _key_path(context, exc.obj, exc.name)
        return TemplateError(f"data.{key}", f"undefined in {where}")
    if isinstance(exc, jinja2.TemplateSyntaxError):
        return TemplateError("template", f"{exc.filename or where} line {exc.lineno}: {exc.message}")
    if isinstance(exc, jinja2.TemplateNotFound):
        return TemplateError("template", f"{where}: template {exc.name!r} not found")
    if isinstance(exc, jinja2.UndefinedError | SecurityError):
        return TemplateError("template", f"{where}: {exc.message}")
    return TemplateError("template", f"{where}: {type(exc).__name__}: {exc}")


def _key_path(context: Mapping[str, Any], obj: Any, name: Any) -> str:
    """``name`` when a top-level variable is missing, else the path of the value it was
    looked up on (``user.first`` for ``{{ user.first }}``), found by identity."""
    if obj is missing:
        return str(name)
    path = _find(context, obj, 0)
    if path is None:
        return str(name)
    if path and path[0] == "data":
        path = path[1:]
    return ".".join([*path, str(name)])


def _find(node: Any, target: Any, depth: int) -> list[str] | None:
    if node is target:
        return []
    if depth > 20:
        return None
    items: Iterable[tuple[Any, Any]]
    if isinstance(node, Mapping):
        items = node.items()
    elif isinstance(node, list | tuple):
        items = enumerate(node)
    else:
        return None
    for key, value in items:
        if isinstance(value, Mapping | list | tuple):
            found = _find(value, target, depth + 1)
            if found is not None:
                return [str(key), *found]
    return None


# -- templates --------------------------------------------------------------------


class Templates:
    """The templates of one directory, each file compiled at most once.

    Rendering is thread-safe; build one ``Templates`` per process (it is not
    picklable: hand a worker process the settings, not the object).
    """

    def __init__(self, directory: str | Path, *, timeout: float = DEFAULT_TIMEOUT,
                 max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.directory = Path(directory)
        self.timeout = timeout
        self.max_bytes = max_bytes
        self._env = _environment(jinja2.FileSystemLoader(self.directory, followlinks=False))
        # "NAME.part" -> compiled template, None (no such file), or the error it raised
        self._compiled: dict[str, jinja2.Template | TemplateError | None] = {}
        self._prefix = str(self.directory)

    @classmethod
    def from_settings(cls, settings: TemplatesSettings) -> Templates:
        return cls(settings.dir, timeout=settings.timeout, max_bytes=settings.max_bytes)

    def _template(self, filename: str) -> jinja2.Template | None:
        try:
            found = self._compiled[filename]
        except KeyError:
            found = self._load(filename)
            self._compiled[filename] = found
        if isinstance(found, TemplateError):
            raise found
        return found

    def _load(self, filename: str) -> jinja2.Template | TemplateError | None:
        try:
            return self._env.get_template(filename)
        except jinja2.TemplateNotFound as exc:
            if exc.name != filename:  # an {% extends %} of a file that is missing
                return TemplateError("template", f"{self.directory / filename}: template {exc.name!r} not found")
            return None
        except jinja2.TemplateSyntaxError as exc:
            return TemplateError("template", f"{exc.filename or filename} line {exc.lineno}: {exc.message}")
        except OSError as exc:
            return TemplateError("template", f"{self.directory / filename}: cannot read: {exc.strerror}")
        except UnicodeDecodeError:
            return TemplateError("template", f"{self.directory / filename}: not UTF-8")

    def _where(self, name: str, part: str) -> Callable[[], str]:
        return lambda: f"{self.directory / name}.{part}"

    def render(self, name: str, context: Mapping[str, Any], parts: Iterable[Part] = PARTS) -> Rendered:
        """Render the ``parts`` of template ``name`` that exist. Raises TemplateError
        when none of ``NAME.subject``, ``NAME.text``, ``NAME.html`` exists, or one fails."""
        if not _TEMPLATE_NAME.fullmatch(name):
            raise TemplateError("template", f"{name!r} is not a template name")
        if all(self._template(f"{name}.{part}") is None for part in PARTS):
            if not self.directory.is_dir():
                # The configuration's fault, not the job's: the run stops (SETTINGS_FIELDS).
                raise TemplateError("templates.dir", f"{str(self.directory)!r} does not exist (a relative "
                                                     f"directory is taken from {str(Path.cwd())!r})")
            raise TemplateError("template", f"no template {name!r} in {self.directory} "
                                            f"({name}.subject, {name}.text or {name}.html)")
        out: dict[str, str | None] = dict.fromkeys(PARTS)
        variables = {**self._env.globals, **context}
        deadline = time.thread_time() + self.timeout  # one budget for the job's parts together
        for part in parts:
            template = self._template(f"{name}.{part}")
            if template is None:
                continue
            value = _render(template, variables, context, self._where(name, part), self._prefix,
                            timeout=self.timeout, max_bytes=self.max_bytes, deadline=deadline)
            out[part] = value.strip() if part == "subject" else value
        return Rendered(out["subject"], out["text"], out["html"])

    def compose(self, job: TemplatedJob, *, default_from: str | None = None,
                unsubscribe: Unsubscribe | None = None) -> dict[str, Any]:
        """The composed-job document of ``job``: its own fields, ``from`` defaulting to
        ``default_from``, the template's parts the job does not give, and the
        unsubscribe headers unless the job sets List-Unsubscribe. Raises TemplateError.
        """
        fields = job.fields()
        if "from" not in fields and default_from is not None:
            fields["from"] = default_from
        context = job_context(fields, job.data)
        wanted = [part for part in PARTS if part not in fields]
        rendered = self.render(job.template, context, wanted)
        for part in wanted:
            value = getattr(rendered, part)
            if value is not None:
                fields[part] = value
        if "subject" not in fields:
            raise TemplateError("template", f"{self.directory / job.template}.subject does not exist "
                                            "and the job gives no subject")
        if unsubscribe is not None:
            fields["headers"] = merge_unsubscribe(fields.get("headers") or {}, unsubscribe.headers(context))
        return fields


# -- unsubscribe ------------------------------------------------------------------

# RFC 3986 reserved and unreserved characters, and '%': everything else a rendered
# URL holds (space, <, >, ", CR, LF, non-ASCII) is percent-encoded, so a value from a
# job can never end the <...> or the header field.
_URL_SAFE = "!#$%&'()*+,/:;=?@[]~-._"
# A header word longer than this is written as encoded words by dispatcher.compose.mime (a line
# holds at most 998 octets and folds only at white space): a URI must stay one plain word.
_MAX_URI = 760


class Unsubscribe:
    """``List-Unsubscribe`` (and ``List-Unsubscribe-Post``) for each job, from a URL
    template and/or a mailto address; both compiled once."""

    def __init__(self, *, url: str | None = None, mailto: str | None = None, secret: str | None = None) -> None:
        """Raises ValueError (naming ``unsubscribe.url`` or ``.mailto``) on a syntax error.
        With ``secret``, ``{{ token }}`` is the signed token of the job id and its first
        recipient (``dispatcher.loop.tokens``)."""
        if url is None and mailto is None:
            raise ValueError("unsubscribe: give url, mailto or both")
        self._secret = secret
        env = _environment()
        self._globals = env.globals
        self._url = self._compile(_environment(finalize=_url_value), url, "url")
        if mailto is not None and not mailto.lower().startswith("mailto:"):
            mailto = "mailto:" + mailto
        self._mailto = self._compile(env, mailto, "mailto")
        # A part without a {{ tag }} (a fixed mailto address) is the same for every job: rendered once here.
        self._url_text = self._constant(self._url, url)
        self._mailto_uri: str | None = None
        if (mailto_text := self._constant(self._mailto, mailto)) is not None:
            try:
                self._mailto_uri = _uri(quote(mailto_text.strip(), safe=_URL_SAFE), "unsubscribe.mailto")
            except TemplateError:
                pass  # too long for a header line: said for each job, as for a rendered one

    @staticmethod
    def _compile(env: _Sandbox, source: str | None, key: str) -> jinja2.Template | None:
        if source is None:
            return None
        try:
            return env.from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise ValueError(f"unsubscribe.{key}: not a valid template: {exc.message}") from None

    @staticmethod
    def _constant(template: jinja2.Template | None, source: str | None) -> str | None:
        """What ``template`` renders for any job, when its source holds no Jinja2
        delimiter at all (``{{``, ``{%`` and ``{#`` all start with ``{``); else None."""
        if template is None or source is None or "{" in source:
            return None
        return _render(template, dict(template.environment.globals), {}, lambda: "unsubscribe", None)

    @classmethod
    def from_settings(cls, settings: UnsubscribeSettings) -> Unsubscribe | None:
        """None when the section sets neither url nor mailto."""
        if settings.url is None and settings.mailto is None:
            return None
        if settings.url is not None and not settings.url.strip().lower().startswith("https://"):
            # RFC 8058 one-click needs https: Gmail and Yahoo show no unsubscribe button then.
            structlog.get_logger("dispatcher").warning(
                "unsubscribe.not_https", detail="unsubscribe.url is not an https URL: messages get no "
                "List-Unsubscribe-Post (one-click, RFC 8058)")
        secret = settings.secret.get_secret_value() if settings.secret is not None else None
        return cls(url=settings.url, mailto=settings.mailto, secret=secret)

    def headers(self, context: Mapping[str, Any]) -> dict[str, str]:
        """The headers for one job (``job_context``). ``List-Unsubscribe-Post:
        List-Unsubscribe=One-Click`` only with an https URL (RFC 8058 section 3).
        Raises TemplateError (``data.KEY``, or ``unsubscribe.url`` when the URL
        rendered is not http(s))."""
        uris = []
        one_click = False
        variables = {**self._globals, **context}
        if self._secret is not None:
            recipient = first_recipient(context.get("to") or context.get("cc") or context.get("bcc"))
            if recipient is not None:
                variables["token"] = make_token(self._secret, str(context.get("id")), recipient)
        if self._url is not None:
            rendered = self._url_text
            if rendered is None:
                rendered = _render(self._url, variables, context, lambda: "unsubscribe.url", None)
            url = quote(rendered.strip(), safe=_URL_SAFE)
            scheme = url[:8].lower()
            if not scheme.startswith(("https://", "http://")):
                raise TemplateError("unsubscribe.url", f"rendered {url[:60]!r}, not an http(s) URL")
            uris.append(_uri(url, "unsubscribe.url"))
            one_click = scheme == "https://"
        if self._mailto is not None:
            uri = self._mailto_uri
            if uri is None:
                mailto = _render(self._mailto, variables, context, lambda: "unsubscribe.mailto", None)
                uri = _uri(quote(mailto.strip(), safe=_URL_SAFE), "unsubscribe.mailto")
            uris.append(uri)
        headers = {"List-Unsubscribe": ", ".join(uris)}
        if one_click:
            headers["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
        return headers



def _uri(uri: str, field: str) -> str:
    if len(uri) > _MAX_URI:
        raise TemplateError(field, f"rendered {len(uri)} characters, more than the {_MAX_URI} a header line can hold")
    return f"<{uri}>"


@functools.lru_cache(maxsize=16)
def _unsubscribe(url: str | None, mailto: str | None) -> Unsubscribe:
    return Unsubscribe(url=url, mailto=mailto)


def unsubscribe_headers(url_template: str | None, mailto: str | None, context: Mapping[str, Any]) -> dict[str, str]:
    """``Unsubscribe(url=url_template, mailto=mailto).headers(context)``, compiled once
    per distinct pair. A job that sets its own List-Unsubscribe keeps it: the caller
    merges with ``merge_unsubscribe``."""
    return _unsubscribe(url_template, mailto).headers(context)


def merge_unsubscribe(job_headers: Mapping[str, str], generated: Mapping[str, str]) -> dict[str, str]:
    """The job's headers plus ``generated``, unless the job sets List-Unsubscribe
    itself (any case): then the job's header wins and no List-Unsubscribe-Post is
    added for a URL the job did not ask for."""
    names = {name.lower() for name in job_headers}
    if "list-unsubscribe" in names:
        return dict(job_headers)
    merged = dict(job_headers)
    for name, value in generated.items():
        if name.lower() not in names:
            merged[name] = value
    return merged
