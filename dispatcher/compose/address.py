"""Strict mailboxes: one address a string, never a guess (RFC 5321, 5322, 6531).

``parse_mailbox("Ada <ada@example.net>")`` returns the display name and the address,
or raises ValueError saying why. What a lenient parser would have to guess at is an
error: two addresses in one string, an address inside a display name, unbalanced
brackets or quotes, a local part that is only valid quoted, a domain literal.

The syntax is ``email-validator``'s (deliverability checks off). It costs ~70 µs an
address, mostly the domain's IDNA checks, so two things keep it off a campaign's
budget: results are cached per string, and a plain ``local@domain`` (an RFC 5322
dot-atom local part, an ASCII domain) has only its domain validated by the library,
once per domain (so has ``Name <local@domain>`` with an ASCII name).
``tests/test_address.py`` checks that this shortcut gives the
library's answer.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from email_validator import EmailNotValidError

#: RFC 5322 section 3.2.3 dot-atom (ASCII), RFC 5321 section 4.5.3.1.1 at most 64 octets.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_PLAIN = re.compile(rf"({_ATEXT}+(?:\.{_ATEXT}+)*)@([A-Za-z0-9.-]+)")
#: The same inside ``Name <...>``, the name atoms or a quoted string of printable ASCII.
_NAMED = re.compile(rf"(?:({_ATEXT}+(?: {_ATEXT}+)*)|\"([ !#-\[\]-~]*)\") <{_PLAIN.pattern}>")
_MAX_LOCAL = 64
_MAX_ADDRESS = 254  # RFC 5321 section 4.5.3.1.3 (a path of 256 octets, brackets included)
#: A display name written without quotes: words of atext, dots (RFC 5322 obs-phrase)
#: and non-ASCII letters (RFC 6532), separated by spaces.
_BARE_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\- \u0080-\U0010ffff]+")
_ADDRESS_IN_NAME = re.compile(r"\S@\S")


@dataclass(frozen=True, slots=True)
class Mailbox:
    """A checked mailbox. ``address`` is what MAIL/RCPT and the header carry: the
    domain in IDNA (ASCII) when the local part is ASCII, so that only a non-ASCII
    local part needs SMTPUTF8 (``smtputf8``)."""

    name: str  # the display name, "" when none
    address: str
    smtputf8: bool


def parse_mailbox(value: str) -> Mailbox:
    """``local@domain`` or ``Display Name <local@domain>``. Raises ValueError."""
    if "\r" in value or "\n" in value:
        raise ValueError("contains CR or LF (header injection)")
    return _parse(value, True)


def parse_address(value: str) -> Mailbox:
    """A bare ``local@domain`` (an envelope address: no display name). Raises ValueError."""
    if "\r" in value or "\n" in value:
        raise ValueError("contains CR or LF (header injection)")
    return _parse(value, False)


@functools.lru_cache(maxsize=65536)
def _parse(value: str, display_name: bool) -> Mailbox:
    plain = _PLAIN.fullmatch(value)
    if plain is not None and len(plain.group(1)) <= _MAX_LOCAL and len(value) <= _MAX_ADDRESS:
        return Mailbox("", plain.group(1) + "@" + _domain(plain.group(2), value), False)
    named = _NAMED.fullmatch(value) if display_name else None
    if named is not None and len(named.group(3)) <= _MAX_LOCAL \
            and len(named.group(3)) + len(named.group(4)) < _MAX_ADDRESS:
        name = named.group(1) or named.group(2)
        if not _ADDRESS_IN_NAME.search(name):
            return Mailbox(name, named.group(3) + "@" + _domain(named.group(4), value), False)
    return validated(value, display_name)


def validated(value: str, display_name: bool) -> Mailbox:
    """The library's verdict on ``value`` alone, uncached (what the shortcuts equal)."""
    from email_validator import EmailNotValidError, validate_email  # 75 ms to import: when first needed

    try:
        checked = validate_email(_quote_bare_name(value) if display_name else value, check_deliverability=False,
                                 allow_smtputf8=True, allow_display_name=display_name, allow_quoted_local=False,
                                 allow_domain_literal=False, strict=True)
    except EmailNotValidError as exc:
        raise ValueError(f"{_shown(value)} is not one valid email address: {exc}") from None
    name = checked.display_name or ""
    if _ADDRESS_IN_NAME.search(name):
        raise ValueError(f"{_shown(value)}: the display name {name!r} looks like an address; "
                         "give the name without it")
    if checked.ascii_email is not None:
        return Mailbox(name, checked.ascii_email, False)
    return Mailbox(name, checked.normalized, True)


@functools.lru_cache(maxsize=4096)
def _checked_domain(domain: str) -> str | EmailNotValidError:
    from email_validator import EmailNotValidError, validate_email

    try:
        return validate_email("x@" + domain, check_deliverability=False, strict=True).ascii_domain
    except EmailNotValidError as exc:
        return exc


def _domain(domain: str, value: str) -> str:
    """The ASCII domain of an address whose local part is a plain dot-atom."""
    checked = _checked_domain(domain)
    if not isinstance(checked, str):
        raise ValueError(f"{_shown(value)} is not one valid email address: {checked}")
    return checked


def _quote_bare_name(value: str) -> str:
    """``Zoë Dupont <z@example.net>`` as ``"Zoë Dupont" <z@example.net>``: the
    library takes only ASCII atoms unquoted, where RFC 6532 allows UTF-8 and RFC 5322
    (obsolete syntax) dots. Quoting a name made only of such characters changes
    nothing but that; any other name is left for the library to judge."""
    name, bracket, rest = value.partition("<")
    name = name.strip(" ")
    if not bracket or not name or (name.isascii() and "." not in name) or not _BARE_NAME.fullmatch(name):
        return value
    return f'"{name}" <{rest}'


def _shown(value: str) -> str:
    return repr(value if len(value) <= 100 else value[:100] + "...")
