"""Checks of the values written in rules and declarations (E210-E218).

Condition values (networks, ports, SNI patterns, ALPN names) get their meaning from
lang.values; this module only turns its ValueErrors into diagnostics with a hint that
shows the corrected spelling. Endpoints, weights, health-check settings and Redis
member patterns are checked here. Each function returns diagnostics; nothing raises.
No I/O.
"""

from __future__ import annotations

import ipaddress

from dynproxy.lang import ast
from dynproxy.lang.clauses import MAX_ALPN_BYTES, atoms_of
from dynproxy.lang.diagnostics import Diagnostic, Note, error, help_
from dynproxy.lang.values import (
    check_hostname,
    check_port_range,
    normalize_sni,
    parse_network,
    parse_sni_pattern,
)

MAX_WEIGHT = 1000
DEFAULT_INTERVAL = 2.0  # seconds, as HAProxy's `inter`


# --- conditions -----------------------------------------------------------------


def condition_diagnostics(cond: ast.Cond | None) -> list[Diagnostic]:
    out: list[Diagnostic] = []
    for atom in atoms_of(cond):
        if isinstance(atom, ast.Sni):
            out += [d for i in atom.patterns if (d := sni_diagnostic(atom.op, i))]
        elif isinstance(atom, ast.Src):
            out += [d for i in atom.networks if (d := network_diagnostic(i))]
        elif isinstance(atom, ast.Dport):
            out += [d for r in atom.ranges if (d := port_diagnostic(r))]
        elif isinstance(atom, ast.Alpn):
            out += alpn_diagnostics(atom.protocols)
    return out


def sni_diagnostic(op: str, item: ast.Item) -> Diagnostic | None:
    try:
        parse_sni_pattern(op, item.value)
    except ValueError as exc:
        message = str(exc)
        if op == "suffix" and ("*" in item.value or "?" in item.value):
            message = f"suffix {item.value!r} contains a wildcard; a suffix is literal text"
        return error("E212", f"bad SNI pattern: {message}", item.pos, *_sni_hints(op, item.value))
    return None


def _sni_hints(op: str, raw: str) -> list[Note]:
    value = raw.lower().rstrip(".")
    if op == "suffix" and not value.startswith("."):
        base = value.lstrip("*").lstrip(".")
        if value.startswith("*."):
            return [help_(f'for every name under {base}, write: sni suffix ".{base}"'),
                    help_(f'for exactly one label before {base}, write: sni glob "*.{base}"')]
        return [help_(f'for the names under it, write: sni suffix ".{base}"'),
                help_(f'for {base} itself, write: sni exact "{base}"')]
    if op in ("exact", "suffix") and ("*" in value or "?" in value):
        return [help_(f'for wildcards, write: sni glob "{value.lstrip(".")}"')]
    if op == "glob" and any("*" in lb and lb not in ("*", "**") for lb in value.split(".")):
        return [help_("'*' is one whole label and '**' one or more labels, as in "
                      '"*.example.com"; to match how names begin, use sni prefix')]
    return []


def network_diagnostic(item: ast.Item) -> Diagnostic | None:
    try:
        parse_network(item.value)
    except ValueError as exc:
        return error("E210", f"bad address: {exc}", item.pos, *_network_hints(item.value))
    return None


def _network_hints(raw: str) -> list[Note]:
    try:
        net = ipaddress.ip_network(raw, strict=False)
    except ValueError:
        return [help_("write an IPv4 or IPv6 address, or a CIDR like 10.0.0.0/8 or 2001:db8::/32")]
    host = raw.split("/", 1)[0]
    return [help_(f"write src {net} for the whole network, or src {host} for the one address")]


def port_diagnostic(r: ast.PortRange) -> Diagnostic | None:
    try:
        check_port_range(r.lo, r.hi)
    except ValueError as exc:
        return error("E211", f"bad port: {exc}", r.pos)
    return None


def alpn_diagnostics(items) -> list[Diagnostic]:
    out = []
    for item in items:
        size = len(item.value.encode("utf-8"))
        if not 1 <= size <= MAX_ALPN_BYTES:
            out.append(error(
                "E215", f"bad ALPN protocol {_short(item.value)!r}: it is {size} bytes; a protocol "
                f"name has 1 to {MAX_ALPN_BYTES}", item.pos,
                help_('write a registered name such as "h2" or "http/1.1"'),
            ))
    return out


# --- declarations ---------------------------------------------------------------


def _short(value: str, limit: int = 40) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def endpoint_diagnostic(ep: ast.Endpoint) -> Diagnostic | None:
    problem = _endpoint_problem(ep)
    if problem is None:
        return None
    return error("E213", f"bad endpoint {str(ep)!r}: {problem}", ep.pos,
                 help_("write HOST:PORT with a port from 1 to 65535, IPv6 as [2001:db8::1]:443"))


def _endpoint_problem(ep: ast.Endpoint) -> str | None:
    if not ep.host:
        return "the host is empty"
    if not 1 <= ep.port <= 65535:
        return f"port {ep.port} is out of range 1..65535"
    try:
        if ":" in ep.host:
            ipaddress.IPv6Address(ep.host)
        elif all(label.isdigit() for label in ep.host.split(".")):
            ipaddress.IPv4Address(ep.host)
        else:
            check_hostname(normalize_sni(ep.host))
    except ValueError as exc:
        return str(exc)
    return None


def backend_tls_diagnostics(tls: ast.BackendTls | None) -> list[Diagnostic]:
    if tls is None:
        return []
    out = []
    if tls.sni is not None:
        try:
            check_hostname(normalize_sni(tls.sni))
        except ValueError as exc:
            out.append(error("E213", f"bad TLS server name for the backend: {exc}", tls.pos))
    if tls.ca is not None and not tls.ca.strip():
        out.append(error("E213", "the backend's TLS `ca` file name is empty", tls.pos))
    return out


def weight_diagnostic(weight: int | None, pos: ast.Pos) -> Diagnostic | None:
    if weight is None or weight <= MAX_WEIGHT:
        return None
    return error("E214", f"weight {weight} is too large; weights go from 0 to {MAX_WEIGHT}", pos,
                 help_("weights are relative: 3 and 1 send three times as many connections"))


def health_diagnostics(hc: ast.HealthCheck | None) -> list[Diagnostic]:
    if hc is None:
        return []
    out = []
    for name, value in (("rise", hc.rise), ("fall", hc.fall)):
        if value is not None and value < 1:
            out.append(error("E214", f"health check `{name} {value}`: it must be at least 1", hc.pos))
    for name, value in (("every", hc.interval), ("timeout", hc.timeout)):
        if value is not None and value <= 0:
            out.append(error("E214", f"health check `{name}` is 0; it must be positive", hc.pos))
    interval = DEFAULT_INTERVAL if hc.interval is None else hc.interval
    if hc.timeout and interval and hc.timeout >= interval:
        which = "the default interval" if hc.interval is None else "the interval"
        out.append(error(
            "E214", f"health check timeout {_secs(hc.timeout)} is not shorter than {which} "
            f"{_secs(interval)}", hc.pos,
            help_("make the timeout shorter than `every`, so that one check ends before the "
                  "next begins"),
        ))
    return out


def _secs(value: float) -> str:
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def redis_pattern_diagnostic(rm: ast.RedisMembers) -> Diagnostic | None:
    problem = _glob_problem(rm.pattern)
    if problem is None:
        return None
    hints = [help_('write the name part of the keys, e.g. members from redis "web-*" for '
                   "keys proxy:backends:web-*")]
    return error("E218", f"bad Redis member pattern {rm.pattern!r}: {problem}", rm.pos, *hints)


def _glob_problem(pattern: str) -> str | None:
    if not pattern:
        return "it is empty"
    if any(ch.isspace() or not ch.isprintable() for ch in pattern):
        return "it contains spaces or control characters"
    if pattern.startswith("proxy:backends:"):
        return "it includes the key prefix proxy:backends:, which is added for you"
    i = 0
    while i < len(pattern):
        ch = pattern[i]
        if ch == "\\":
            if i + 1 == len(pattern):
                return "it ends with a lone backslash"
            i += 2
            continue
        if ch == "[":
            close = _class_end(pattern, i + 1)
            if close is None:
                return "a '[' is never closed by ']'"
            i = close
        i += 1
    return None


def _class_end(pattern: str, i: int) -> int | None:
    while i < len(pattern):
        if pattern[i] == "\\":
            i += 2
            continue
        if pattern[i] == "]":
            return i
        i += 1
    return None
