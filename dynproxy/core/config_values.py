"""Value kinds of the configuration: what a setting may hold, and how it is read.

A kind turns a plain value as YAML gives it (str, int, float, bool, None, list, dict)
into the typed value the proxy uses (seconds as a float, a Bind, a tuple, ...), or
reports the form it expected. `from_text` reads the same value from a command-line
string, so a flag is validated exactly like the YAML key it overrides.

Must never do I/O nor import gevent, socket, ssl or redis: the master reads this
before anything starts, and tests feed it plain values.
"""

from __future__ import annotations

import difflib
import ipaddress
import math
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from dynproxy.core.config_problems import Path, ProblemCollector, short_repr

__all__ = [
    "INVALID", "Bind", "BindAddress", "Boolean", "Choice", "Duration", "Integer", "Invalid", "Kind",
    "ListOf", "Nullable", "RedisUrl", "ServerName", "Text", "TlsVersion", "parse_bind",
    "parse_duration",
]

INVALID: Any = type("Invalid", (), {"__repr__": lambda self: "INVALID"})()  # a failed check


class Invalid(Exception):
    """A value does not have the expected form; `reason` and `hint` say more when known."""

    def __init__(self, reason: str | None = None, hint: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.hint = hint


@dataclass(frozen=True, slots=True)
class Bind:
    """An address to listen on. host is an IP literal or a hostname; "" means all."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_wildcard(self) -> bool:
        return self.host in ("", "0.0.0.0", "::")


_DNS_LABEL = re.compile(r"(?!-)[a-z0-9-]{1,63}(?<!-)")
_DIGITS_AND_DOTS = re.compile(r"[0-9.]+")
_BIND_HINT = 'write "HOST:PORT", "[IPv6]:PORT" or ":PORT" (quoted in YAML)'


def _is_hostname(name: str) -> bool:
    labels = name.split(".")
    return (len(name) <= 253 and not _DIGITS_AND_DOTS.fullmatch(name)
            and all(_DNS_LABEL.fullmatch(label) for label in labels))


def _parse_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or not 1 <= int(text) <= 65535:
        raise Invalid(f"port {text!r} is not a number from 1 to 65535")
    return int(text)


def _parse_ip(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise Invalid(f"{text!r} is not an IPv{version} address") from None
    if address.version != version:
        raise Invalid(f"{text!r} is not an IPv{version} address")
    return str(address)


def parse_bind(text: str) -> Bind:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' -> Bind; raises Invalid."""
    text = text.strip()
    host, colon, port_text = text.rpartition(":")
    if not colon or text.endswith("]"):
        raise Invalid("no ':PORT'", _BIND_HINT)
    port = _parse_port(port_text)
    if host.startswith("[") and host.endswith("]"):
        return Bind(_parse_ip(host[1:-1], 6), port)
    if ":" in host or "[" in host or "]" in host:
        raise Invalid("IPv6 addresses go in brackets", f"write '[{host.strip('[]')}]:{port}'")
    if not host or _DIGITS_AND_DOTS.fullmatch(host):
        return Bind(host and _parse_ip(host, 4), port)
    if not _is_hostname(host.lower()):
        raise Invalid(f"{host!r} is neither an IP address nor a hostname")
    return Bind(host.lower(), port)


_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*(ms|s|m|h)?", re.IGNORECASE)
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}


def parse_duration(value: object) -> float:
    """5, 0.5, "500ms", "5s", "2m", "1h" -> seconds; raises Invalid."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise Invalid()
    if isinstance(value, str):
        match = _DURATION.fullmatch(value.strip())
        if not match:
            raise Invalid()
        value = float(match[1]) * _UNIT_SECONDS[(match[2] or "").lower()]
    seconds = float(value) if abs(value) < 1e300 else math.inf  # float() of a huge int raises
    if not math.isfinite(seconds) or seconds < 0:
        raise Invalid("not a finite, non-negative duration")
    return seconds


class Kind:
    """How one setting's value is checked and converted. Subclasses set `expected`."""

    expected = "a value"

    def check(self, value: object, at: Path, report: ProblemCollector,
              expected: str | None = None) -> object:
        """The converted value, or INVALID after reporting why (as `expected`, if given)."""
        try:
            return self.convert(value)
        except Invalid as problem:
            report.invalid(at, self.shown(value), expected or self.expected,
                           reason=problem.reason, hint=problem.hint)
            return INVALID

    def convert(self, value: object) -> object:
        raise NotImplementedError

    def from_text(self, text: str) -> object:
        """The value a command-line string stands for (before check)."""
        return text

    def shown(self, value: object) -> str:
        """The value as an error message shows it (bounded; secrets masked)."""
        return short_repr(value)

    def to_plain(self, parsed: object, *, redact: bool = False) -> object:
        """The checked value back as plain data that check() accepts again.

        With `redact`, secrets are masked (for display; the result then may not load).
        """
        return parsed


class BindAddress(Kind):
    expected = '"HOST:PORT", "[IPv6]:PORT" or ":PORT" for all addresses'

    def convert(self, value: object) -> Bind:
        if isinstance(value, int) and not isinstance(value, bool):
            raise Invalid("a port alone", f"write ':{value}' for all addresses, or 'HOST:{value}'")
        if not isinstance(value, str):
            quote = "quote it in YAML: unquoted, [::1]:8443 reads as a list"
            raise Invalid(hint=quote if isinstance(value, list) else None)
        return parse_bind(value)

    def to_plain(self, parsed: object, *, redact: bool = False) -> object:
        return str(parsed)


class Duration(Kind):
    def __init__(self, *, allow_zero: bool = False) -> None:
        self.allow_zero = allow_zero
        zero = "zero or more" if allow_zero else "more than zero"
        self.expected = f"a duration ({zero}) in seconds, or like '500ms', '5s', '2m', '1h'"

    def convert(self, value: object) -> float:
        seconds = parse_duration(value)
        if seconds == 0 and not self.allow_zero:
            raise Invalid("must be more than zero")
        return seconds


class Integer(Kind):
    def __init__(self, low: int, high: int) -> None:
        self.low, self.high = low, high
        self.expected = f"an integer from {low:_} to {high:_}".replace("_", ",")

    def convert(self, value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid()
        if not self.low <= value <= self.high:
            raise Invalid("out of range")
        return value

    def from_text(self, text: str) -> object:
        return int(text) if re.fullmatch(r"\s*[+-]?[0-9]+\s*", text) else text


class Boolean(Kind):
    expected = "true or false"
    _TEXT = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}

    def convert(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise Invalid()
        return value

    def from_text(self, text: str) -> object:
        return self._TEXT.get(text.strip().lower(), text)


class Text(Kind):
    """A non-empty single-line string, optionally of a given shape."""

    def __init__(self, expected: str = "a non-empty string", pattern: str | None = None,
                 *, max_length: int = 4096) -> None:
        self.expected = expected
        self.pattern = re.compile(pattern) if pattern else None
        self.max_length = max_length

    def convert(self, value: object) -> str:
        if not isinstance(value, str) or not value or len(value) > self.max_length:
            raise Invalid()
        if not value.isprintable():
            raise Invalid("contains control characters")
        if self.pattern and not self.pattern.fullmatch(value):
            raise Invalid()
        return value


class Choice(Kind):
    """One of a few words (compared case-insensitively, kept in lower case)."""

    def __init__(self, *options: str) -> None:
        self.options = options
        self.expected = "one of " + ", ".join(repr(option) for option in options)

    def convert(self, value: object) -> str:
        if not isinstance(value, str):
            raise Invalid()
        word = value.strip().lower()
        if word not in self.options:
            close = difflib.get_close_matches(word, self.options, n=1, cutoff=0.5)
            raise Invalid(hint=f"did you mean {close[0]!r}?" if close else None)
        return word


class TlsVersion(Choice):
    """'1.2' or '1.3'; YAML reads an unquoted 1.2 as a float, which is accepted too."""

    def __init__(self) -> None:
        super().__init__("1.2", "1.3")

    def convert(self, value: object) -> str:
        if isinstance(value, float):
            value = repr(value)
        if isinstance(value, str) and value.strip() in ("1.0", "1.1"):
            raise Invalid("TLS 1.0 and 1.1 are insecure and never offered")
        return super().convert(value)


class ServerName(Kind):
    """A DNS name a certificate serves: 'api.example.com' or '*.example.com'."""

    expected = "a host name like 'api.example.com' or a wildcard like '*.example.com'"

    def convert(self, value: object) -> str:
        if not isinstance(value, str):
            raise Invalid()
        name = value.strip().rstrip(".").lower()
        if not name.isascii():  # international names are compared as A-labels
            try:
                name = name.encode("idna").decode("ascii")
            except UnicodeError:
                raise Invalid("not a valid international name") from None
        base = name[2:] if name.startswith("*.") else name
        if not _is_hostname(base) or "*" in base:
            raise Invalid(hint="a wildcard is allowed only as the whole first label")
        return name


class RedisUrl(Kind):
    expected = "a URL 'redis://[:PASSWORD@]HOST[:PORT][/DB]' (or 'rediss://' for TLS)"

    def convert(self, value: object) -> str:
        if not isinstance(value, str) or not value.isprintable():
            raise Invalid()
        try:
            parts = urlsplit(value.strip())
            port = parts.port
        except ValueError as problem:
            raise Invalid(str(problem)) from None
        if parts.scheme not in ("redis", "rediss"):
            raise Invalid(f"scheme {parts.scheme!r} is not redis or rediss")
        if not parts.hostname:
            raise Invalid("no host")
        if port == 0:
            raise Invalid("port 0")
        db = parts.path.lstrip("/")
        if db and not (db.isascii() and db.isdigit()):
            raise Invalid(f"database {db!r} is not a number")
        return value.strip()

    def shown(self, value: object) -> str:
        return short_repr(self.masked(value) if isinstance(value, str) else value)

    def to_plain(self, parsed: object, *, redact: bool = False) -> object:
        return self.masked(parsed) if redact else parsed  # type: ignore[arg-type]

    @staticmethod
    def masked(url: str) -> str:
        """The URL with its password replaced by '***' (for logs and errors)."""
        scheme, sep, rest = url.partition("://")
        userinfo, at, host = rest.rpartition("@")
        if not sep or not at or ":" not in userinfo:
            return url
        return f"{scheme}://{userinfo.split(':', 1)[0]}:***@{host}"


class Nullable(Kind):
    """The inner kind, or null (None)."""

    _NULL_TEXT = frozenset({"", "null", "none", "~"})

    def __init__(self, inner: Kind, meaning: str = "") -> None:
        self.inner = inner
        self.expected = f"{inner.expected}, or null{meaning}"

    def check(self, value: object, at: Path, report: ProblemCollector,
              expected: str | None = None) -> object:
        if value is None:
            return None
        return self.inner.check(value, at, report, expected or self.expected)

    def from_text(self, text: str) -> object:
        return None if text.strip().lower() in self._NULL_TEXT else self.inner.from_text(text)

    def shown(self, value: object) -> str:
        return self.inner.shown(value)

    def to_plain(self, parsed: object, *, redact: bool = False) -> object:
        return None if parsed is None else self.inner.to_plain(parsed, redact=redact)


class ListOf(Kind):
    """A list of items of one kind, checked item by item; becomes a tuple.

    With `accept_single`, one bare item stands for a list of that item (operators of
    the original system wrote `tcp_bind: "0.0.0.0:8080"`).
    """

    def __init__(self, item: Kind, *, accept_single: bool = False) -> None:
        self.item = item
        self.accept_single = accept_single
        self.expected = f"a list, each item {item.expected}"

    def check(self, value: object, at: Path, report: ProblemCollector,
              expected: str | None = None) -> object:
        if self.accept_single and value is not None and not isinstance(value, list | tuple):
            checked = self.item.check(value, at, report, expected or self.expected)
            return INVALID if checked is INVALID else (checked,)
        if not isinstance(value, list | tuple):
            report.invalid(at, self.shown(value), expected or self.expected)
            return INVALID
        items = tuple(self.item.check(v, (*at, i), report) for i, v in enumerate(value))
        return INVALID if any(item is INVALID for item in items) else items

    def from_text(self, text: str) -> object:
        return [self.item.from_text(text)]

    def to_plain(self, parsed: object, *, redact: bool = False) -> object:
        return [self.item.to_plain(item, redact=redact) for item in parsed]  # type: ignore[attr-defined]
