"""The meaning of the values written in rules: SNI names and patterns, networks, ports.

One place decides what `sni suffix ".example.com"` or `src 10.0.0.0/8` means, so
the linter, the compiler and the REPL cannot disagree. Each parse function returns
the normalised value or raises ValueError with a message fit for a diagnostic.
No I/O.
"""

from __future__ import annotations

import ipaddress
import re

_LABEL = re.compile(r"^[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?$")
_GLOB_LABEL = re.compile(r"^(\*\*?|[a-z0-9_?-]+)$")
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def normalize_sni(name: str) -> str:
    """Lower-case, strip one trailing dot, convert international labels to A-labels."""
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if name.isascii():
        return name
    try:
        return name.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"{name!r} is not a valid international domain name ({exc})") from None


def check_hostname(name: str) -> None:
    """Raise ValueError unless `name` (normalised) is a plausible DNS name."""
    if not name or len(name) > 253:
        raise ValueError(f"{name!r} is not a host name (1 to 253 characters)")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise ValueError(f"{name!r} has an invalid label {label!r}")


def parse_sni_pattern(op: str, raw: str) -> str:
    """Validate and normalise one `sni OP "PATTERN"` value."""
    if op == "prefix":  # a prefix keeps its trailing dot: "admin." must not match "administrator"
        value = raw.lower()
        _check_prefix(raw, value)
        return value
    value = normalize_sni(raw)
    if op == "exact":
        if "*" in value or "?" in value:
            raise ValueError(f"{raw!r} contains a wildcard; use `sni glob {raw!r}`")
        check_hostname(value)
    elif op == "suffix":
        _check_suffix(raw, value)
    else:
        _check_glob(raw, value)
    return value


def _check_suffix(raw: str, value: str) -> None:
    if not value.startswith("."):
        raise ValueError(
            f"suffix {raw!r} does not start with '.', so it would also match "
            f"'evil{value}'"
        )
    if "*" in value or "?" in value:
        raise ValueError(f"suffix {raw!r} contains a wildcard; use `sni glob`")
    check_hostname(value[1:])


def _check_prefix(raw: str, value: str) -> None:
    if not value or "*" in value or "?" in value:
        raise ValueError(f"prefix {raw!r} must be plain characters (no wildcards), not empty")
    if not value.isascii():
        raise ValueError(f"prefix {raw!r} must be ASCII (write international labels as xn--)")
    if not re.fullmatch(r"[a-z0-9_.-]+", value):
        raise ValueError(f"prefix {raw!r} contains characters a host name cannot have")


def _check_glob(raw: str, value: str) -> None:
    labels = value.split(".")
    for label in labels:
        if "*" in label and label not in ("*", "**"):
            raise ValueError(
                f"glob {raw!r} has a partial wildcard {label!r}: '*' stands for one "
                "whole label and '**' for one or more"
            )
        if not _GLOB_LABEL.match(label):
            raise ValueError(f"glob {raw!r} has an invalid label {label!r}")
    if not any(c not in "*?." for c in value):
        raise ValueError(f"glob {raw!r} matches every name; use a rule without `sni`")


def glob_regex(pattern: str) -> str:
    """`*` = one label, `**` = one or more labels, `?` = one character (not a dot)."""
    parts = []
    for label in pattern.split("."):
        if label == "**":
            parts.append(r"[^.]+(?:\.[^.]+)*")
        elif label == "*":
            parts.append(r"[^.]+")
        else:
            parts.append("".join("[^.]" if c == "?" else re.escape(c) for c in label))
    return r"\.".join(parts)


def glob_fixed_suffix(pattern: str) -> str:
    """The literal labels after the last wildcard label, with a leading dot ('' if none).

    `api.*.example.com` -> `.example.com`; used to index globs like suffixes.
    """
    labels = pattern.split(".")
    fixed: list[str] = []
    for label in reversed(labels):
        if "*" in label or "?" in label:
            break
        fixed.append(label)
    if len(fixed) == len(labels):
        return "." + pattern
    return "." + ".".join(reversed(fixed)) if fixed else ""


def parse_network(raw: str) -> IPNetwork:
    """An address or CIDR; host bits must be zero. IPv4-mapped IPv6 becomes IPv4."""
    try:
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError as exc:
        if "has host bits set" in str(exc):
            fixed = ipaddress.ip_network(raw, strict=False)
            raise ValueError(f"{raw!r} has host bits set; the network is {str(fixed)!r}") from None
        raise ValueError(f"{raw!r} is not an IP address or CIDR") from None
    return unmap_network(net)


def unmap_network(net: IPNetwork) -> IPNetwork:
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped:
        return ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return net


def parse_address(raw: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A client address as a connection reports it; IPv4-mapped IPv6 becomes IPv4."""
    addr = ipaddress.ip_address(raw.split("%", 1)[0])
    if addr.version == 6 and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def check_port_range(lo: int, hi: int) -> None:
    for port in (lo, hi):
        if not 1 <= port <= 65535:
            raise ValueError(f"port {port} is out of range 1..65535")
    if lo > hi:
        raise ValueError(f"range {lo}..{hi} is empty; write {hi}..{lo}")
