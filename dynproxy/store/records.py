"""Backend records as operators store them in Redis: parsing, validation, encoding.

One key `<prefix>backends:<name>` holds one backend's JSON, exactly as operators
already write it:

    {"address": "127.0.0.1:8080", "weight": 100, "healthy": true,
     "last_check": 1234567890, "metadata": {}}

`parse_record` turns a stored value into a BackendRecord or a Skipped (with a bounded
reason for the metric and a message for the one log line). Unknown extra fields are
allowed (and kept by write-backs): newer tools may add some. `redis_glob` compiles the
glob of `members from redis "GLOB"` with Redis' own matching rules.

Pure: must never import redis, gevent or socket, nor do I/O (the CLI, the watcher and
the redis_sni plugin all share it).
"""

from __future__ import annotations

import ipaddress
import json
import math
import re
from dataclasses import dataclass
from typing import Any

__all__ = [
    "BackendRecord", "DEFAULT_WEIGHT", "MAX_VALUE_BYTES", "MAX_WEIGHT", "RecordError", "SKIP_REASONS",
    "Skipped", "encode_record", "key_glob", "parse_address", "parse_record",
    "record_fields", "redis_glob", "validate_name",
]

DEFAULT_WEIGHT = 100  # when a key has no "weight": the scale operators' keys use
MAX_VALUE_BYTES = 64 * 1024
MAX_WEIGHT = 1_000_000
MAX_NAME = 253
# The bounded label values of proxy_redis_skipped_keys_total{reason}.
SKIP_REASONS = ("too_large", "invalid_json", "not_object", "bad_name", "bad_address",
                "bad_weight", "bad_healthy", "bad_last_check", "bad_metadata",
                "name_conflict")


class RecordError(ValueError):
    """A backend value or name is wrong: `reason` is one of SKIP_REASONS."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BackendRecord:
    """One valid backend from Redis. `routing` is what decides where traffic goes."""

    name: str
    host: str
    port: int
    weight: int
    healthy: bool
    last_check: float | None

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def routing(self) -> tuple[str, str, int, int]:
        return (self.name, self.host, self.port, self.weight)


@dataclass(frozen=True, slots=True)
class Skipped:
    """A key that is not used: why (a SKIP_REASONS value) and what to tell the operator."""

    name: str
    reason: str
    message: str


def parse_record(name: str, raw: bytes | str) -> BackendRecord | Skipped:
    """The record stored under backend `name`, or why it is skipped."""
    try:
        validate_name(name)
        return _record(name, record_fields(raw))
    except RecordError as err:
        return Skipped(name, err.reason, str(err))


def record_fields(raw: bytes | str) -> dict[str, Any]:
    """The stored JSON object (raises RecordError when it is not one)."""
    if len(raw) > MAX_VALUE_BYTES:
        raise RecordError("too_large", f"value is {len(raw)} bytes; at most "
                          f"{MAX_VALUE_BYTES} are read")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as err:
        shown = raw[:60]
        raise RecordError("invalid_json", f"value {shown!r} is not JSON ({err}); write "
                          'e.g. {"address": "127.0.0.1:8080", "weight": 100}') from None
    if not isinstance(data, dict):
        raise RecordError("not_object", f"value is JSON {type(data).__name__} {data!r:.60}; "
                          'expected an object like {"address": "127.0.0.1:8080"}')
    return data


def _record(name: str, data: dict[str, Any]) -> BackendRecord:
    host, port = parse_address(data.get("address"))
    weight = _weight(data.get("weight", DEFAULT_WEIGHT))
    healthy = _healthy(data.get("healthy", True))
    last_check = _last_check(data.get("last_check"))
    _check_metadata(data.get("metadata"))
    return BackendRecord(name, host, port, weight, healthy, last_check)


def parse_address(value: Any) -> tuple[str, int]:
    """(host, port) from "host:port" or "[v6]:port" (raises RecordError)."""
    if not isinstance(value, str):
        raise RecordError("bad_address", f"address {value!r} must be a string "
                          '"HOST:PORT", e.g. "127.0.0.1:8080" or "[::1]:8080"')
    host, sep, port_text = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ok_host = _is_ipv6(host)
    else:
        ok_host = bool(host) and ":" not in host and _is_hostname_or_ip(host)
    if not sep or not ok_host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise RecordError("bad_address", f"address {value!r} is not HOST:PORT with a port "
                          'in 1..65535; e.g. "127.0.0.1:8080" or "[::1]:8080"')
    return host, int(port_text)


_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def _is_hostname_or_ip(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
        return True
    except ValueError:
        return len(host) <= 253 and _HOSTNAME.fullmatch(host) is not None


def _is_ipv6(host: str) -> bool:
    try:
        ipaddress.IPv6Address(host)
        return True
    except ValueError:
        return False


def _weight(value: Any) -> int:
    if type(value) is not int or not 0 <= value <= MAX_WEIGHT:
        raise RecordError("bad_weight", f"weight {value!r} must be a whole number in "
                          f"0..{MAX_WEIGHT} (0 drains the backend)")
    return value


def _healthy(value: Any) -> bool:
    if type(value) is not bool:
        raise RecordError("bad_healthy", f"healthy {value!r} must be true or false")
    return value


def _last_check(value: Any) -> float | None:
    if value is None:
        return None
    if type(value) not in (int, float) or not 0 <= value < math.inf:
        raise RecordError("bad_last_check", f"last_check {value!r} must be epoch seconds "
                          "(a number >= 0) or null")
    return float(value)


def _check_metadata(value: Any) -> None:
    if value is not None and not isinstance(value, dict):
        raise RecordError("bad_metadata", f"metadata {value!r:.60} must be an object or null")


def validate_name(name: str) -> str:
    """A backend name: printable, no spaces, at most 253 characters."""
    if not name or len(name) > MAX_NAME or any(c.isspace() or not c.isprintable()
                                                for c in name):
        raise RecordError("bad_name", f"backend name {name!r:.80} must be 1..{MAX_NAME} "
                          "printable characters without spaces")
    return name


def encode_record(data: dict[str, Any]) -> str:
    """The JSON text written to Redis (the same layout operators use)."""
    return json.dumps(data, ensure_ascii=False)


def key_glob(prefix: str) -> str:
    """The SCAN MATCH pattern of every backend key under `prefix`."""
    return _escape_glob(prefix) + "backends:*"


def _escape_glob(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)


def redis_glob(pattern: str) -> re.Pattern:
    """A compiled regex matching names as Redis' glob does: `*`, `?`, `[a-z]`, `[^x]`,
    and `\\x` for a literal x."""
    out, i = [], 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\" and i + 1 < len(pattern):
            out.append(re.escape(pattern[i + 1]))
            i += 2
            continue
        if ch == "[":
            end = pattern.find("]", i + 2)
            if end != -1:
                out.append(_char_class(pattern[i + 1:end]))
                i = end + 1
                continue
        out.append({"*": ".*", "?": "."}.get(ch) or re.escape(ch))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def _char_class(body: str) -> str:
    negate = body.startswith("^")
    body = body[1:] if negate else body
    escaped = body.replace("\\", "\\\\").replace("[", "\\[")
    return "[" + ("^" if negate else "") + escaped + "]"
