"""What the master settles before it starts workers: how many, whether their addresses
are free, and which background jobs run. No serving here.
"""

from __future__ import annotations

import errno
import logging
import os

from dynproxy.net.tcp import BindError
from dynproxy.proc.jobs import Jobs
from dynproxy.proc.ports import check_free

log = logging.getLogger("dynproxy")

__all__ = ["StartError", "bind_advice", "check_binds", "make_jobs", "worker_count"]


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
            raise StartError(f"{exc}; {bind_advice(exc)}") from None


def bind_advice(exc: BindError) -> str:
    """What to do about a listen address that cannot be had, by why it cannot."""
    flag = "--tcp-bind" if exc.proto == "tcp" else "--udp-bind"
    elsewhere = f"choose another address (server.{exc.proto}_bind, {flag})"
    if exc.errno == errno.EADDRINUSE:
        ss = "ss -ltnp" if exc.proto == "tcp" else "ss -lunp"
        return (f"`{ss} 'sport = :{exc.port}'` shows the process (as root: any user's); "
                f"stop that process or {elsewhere}")
    if exc.errno == errno.EACCES:
        return f"run with CAP_NET_BIND_SERVICE (AmbientCapabilities= in systemd) or {elsewhere}"
    return elsewhere


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
