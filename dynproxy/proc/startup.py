"""What the master settles before it starts workers: how many, whether their addresses
are free, and which background jobs run. No serving here.
"""

from __future__ import annotations

import logging
import os

from dynproxy.net.tcp import BindError
from dynproxy.proc.jobs import Jobs
from dynproxy.proc.ports import check_free

log = logging.getLogger("dynproxy")

__all__ = ["StartError", "check_binds", "make_jobs", "worker_count"]


class StartError(Exception):
    """The proxy cannot start (or cannot take a new setting): what, and what to do."""


def worker_count(configured: int) -> int:
    """server.workers; 0 means one per CPU this process may run on."""
    if configured > 0:
        return configured
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def check_binds(server, previous) -> None:
    """StartError unless every listener `server` names (and `previous` did not) is free."""
    old = _binds(previous) if previous is not None else set()
    for proto, host, port in sorted(_binds(server) - old, key=str):
        try:
            check_free(proto, host, port)
        except BindError as exc:
            flag = "--tcp-bind" if proto == "tcp" else "--udp-bind"
            raise StartError(f"{exc}; stop that program or choose another address "
                             f"(server.{proto}_bind, {flag})") from None


def _binds(server) -> set[tuple[str, str, int]]:
    tcp = {("tcp", b.host, b.port) for b in server.tcp_bind}
    return tcp | {("udp", u.bind.host, u.bind.port) for u in server.udp_bind}


def make_jobs(config, metrics, publish) -> Jobs:
    """The health checks and the Redis watcher. They run once, in the master: N workers
    must not mean N times the checks against each backend and N watchers on Redis.
    Their events reach the workers through `publish`."""
    return Jobs(config, metrics, publish)


def log_warnings(snapshot) -> None:
    """Rule warnings and certificate warnings of a new snapshot, once (master only)."""
    for warning in snapshot.rules.diagnostics:
        log.warning("%s: %s[%s]: %s", warning.pos, warning.severity, warning.code,
                    warning.message)
    for warning in snapshot.tls.warnings if snapshot.tls is not None else ():
        log.warning("certificate: %s", warning)
