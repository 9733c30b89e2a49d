"""Rules that span several settings (each setting alone is checked by its kind).

A certificate path without its key, two listeners on one port, two certificates or
plugins under one name: each is reported with the key to change and where the other
one is. A check runs only when the settings it reads are valid one by one, so its
problems are never echoes of a problem already reported.

Must never do I/O nor import gevent, socket, ssl or redis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dynproxy.core.config_problems import Path, ProblemCollector, dotted
from dynproxy.core.config_schema import Config
from dynproxy.core.config_values import Bind

__all__ = ["BUILTIN_PLUGINS", "check_config"]

BUILTIN_PLUGINS = frozenset({"redis_sni"})


def check_config(config: Config, report: ProblemCollector) -> None:
    """Report cross-setting problems of `config` into `report`."""
    for reads, check in _CHECKS:
        if not report.has_problems_under(reads):
            check(config, report)


def _check_tls(config: Config, report: ProblemCollector) -> None:
    tls = config.tls
    if (tls.cert_path is None) != (tls.key_path is None):
        given, missing = ("cert_path", "key_path") if tls.key_path is None else ("key_path",
                                                                                 "cert_path")
        report.add(("tls", given), f"is set but tls.{missing} is not", None,
                   "both tls.cert_path and tls.key_path, or neither", f"set tls.{missing}")
    entries = config.tls.certificates
    _check_unique(entries, lambda e: e.hostname, ("tls", "certificates"), "hostname", report)
    _check_unique(entries, lambda e: e.name, ("tls", "certificates"), "name", report)


def _check_plugins(config: Config, report: ProblemCollector) -> None:
    _check_unique(config.plugins, lambda p: p.name, ("plugins",), "name", report)
    for index, plugin in enumerate(config.plugins):
        if plugin.name in BUILTIN_PLUGINS:
            report.add(("plugins", index, "name"), "is the name of a built-in plugin",
                       repr(plugin.name), "a name of your own", "choose another name")


def _check_listeners(config: Config, report: ProblemCollector) -> None:
    server = config.server
    if not server.tcp_bind and not server.udp_bind:
        report.add(("server", "tcp_bind"), "no listeners at all", "[]",
                   "at least one address in server.tcp_bind or server.udp_bind", None)
    tcp = [(("server", "tcp_bind", i), bind) for i, bind in enumerate(server.tcp_bind)]
    if config.monitoring.enable_metrics:
        tcp.append((("monitoring", "metrics_bind"), config.monitoring.metrics_bind))
    _check_overlap(tcp, "TCP", report)
    udp = [(("server", "udp_bind", i, "bind"), listener.bind)
           for i, listener in enumerate(server.udp_bind)]
    _check_overlap(udp, "UDP", report)


def _check_overlap(binds: list[tuple[Path, Bind]], proto: str,
                   report: ProblemCollector) -> None:
    for later, (at, bind) in enumerate(binds):
        for first_at, first in binds[:later]:
            if _overlap(first, bind):
                report.add(at, f"{proto} address overlaps {dotted(first_at)} ({first})",
                           repr(str(bind)), f"a {proto} address no other listener uses",
                           "use another port, or remove one of them")
                break


def _overlap(a: Bind, b: Bind) -> bool:
    return a.port == b.port and (a.host == b.host or a.is_wildcard or b.is_wildcard)


def _check_unique(items: Sequence[object], key: Callable[[object], object], at: Path,
                  field: str, report: ProblemCollector) -> None:
    first_index: dict[object, int] = {}
    for index, item in enumerate(items):
        value = key(item)
        if value is None:
            continue
        if value in first_index:
            report.add((*at, index, field), f"duplicate {field}", repr(value),
                       f"each {field} once", f"first given in {dotted((*at, first_index[value]))}")
        else:
            first_index[value] = index


_CHECKS: tuple[tuple[tuple[Path, ...], Callable[[Config, ProblemCollector], None]], ...] = (
    ((("tls",),), _check_tls),
    ((("plugins",),), _check_plugins),
    ((("server",), ("monitoring",)), _check_listeners),
)
