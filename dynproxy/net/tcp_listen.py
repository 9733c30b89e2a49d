"""Opening TCP listeners and sizing them to the file descriptor limit.

Running out of file descriptors must degrade, never crash or spin: a listener takes at
most as many connections at once as RLIMIT_NOFILE allows (the soft limit is first
raised toward the hard one, as HAProxy does); more wait in the kernel's listen backlog.

Must never: leave a half-opened socket behind (a failed bind closes it and says which
address and why).
"""

from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import sys
from collections.abc import Callable

log = logging.getLogger("dynproxy.tcp")
# Descriptors per connection: the client and upstream sockets, plus a share of the
# splice pipes held while bytes are in flight; as HAProxy sizes them (maxpipes =
# maxconn / 4), 2.5 in all. The reserve covers what a worker opens besides connections.
FDS_PER_TWO_CONNECTIONS = 5
FD_RESERVE = 16


def connection_budget(wanted: int, name: str) -> int:
    """How many connections at once the file descriptor limit allows, at most `wanted`.

    The soft limit is first raised toward the hard one as far as `wanted` needs (as
    HAProxy does); when even that is short, a warning says so once per listener and the
    pool is sized to fit, so extra clients wait in the backlog instead of failing.
    """
    used = _open_fds()
    needed = used + FD_RESERVE + (FDS_PER_TWO_CONNECTIONS * wanted + 1) // 2
    soft = _raise_soft_limit(needed)
    if soft >= needed:
        return wanted
    budget = max(1, 2 * (soft - used - FD_RESERVE) // FDS_PER_TWO_CONNECTIONS)
    log.warning("%s: the file descriptor limit (RLIMIT_NOFILE %d) allows about %d "
                "connections at once, not server.max_connections %d; more wait in the "
                "listen backlog. Raise it (ulimit -n, systemd LimitNOFILE=)",
                name, soft, budget, wanted)
    return budget


def _raise_soft_limit(needed: int) -> int:
    """The soft RLIMIT_NOFILE, raised to `needed` if below it and the hard limit allows
    (up to the hard limit otherwise); unlimited counts as plenty."""
    soft, hard = (_finite(v) for v in resource.getrlimit(resource.RLIMIT_NOFILE))
    if soft < needed:
        raised = min(hard, needed)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, resource.getrlimit(
                resource.RLIMIT_NOFILE)[1]))
            soft = raised
        except (OSError, ValueError):
            pass
    return soft


def _finite(limit: int) -> int:
    return sys.maxsize if limit == resource.RLIM_INFINITY else limit


def _open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # no /proc: assume a typical worker
        return 32


def open_tcp_listener(host: str, port: int, backlog: int, reuse_port: bool) -> socket.socket:
    """A bound, listening socket; IPv6 literals get an AF_INET6 socket (v6 only)."""
    return bound_socket("tcp", host, port, reuse_port, lambda sock: sock.listen(backlog))


def bound_socket(proto: str, host: str, port: int, reuse_port: bool,
                 finish: Callable[[socket.socket], object]) -> socket.socket:
    """A `proto` ("tcp", "udp") socket bound to host:port, then `finish(sock)` (listen,
    non-blocking, ...); any failure closes it and raises BindError. IPv6 literals get
    an AF_INET6 socket (v6 only). SO_REUSEADDR for TCP only (TIME_WAIT leftovers): for
    UDP it would let a second process bind the same port and silently take its
    datagrams, hiding the "port in use" error."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM)
    try:
        if proto == "tcp":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host or "0.0.0.0", port))
        finish(sock)
    except OSError as exc:
        sock.close()
        raise BindError(proto, host, port, exc) from None
    return sock


class BindError(Exception):
    """A listener could not be opened: says which address and why."""

    def __init__(self, proto: str, host: str, port: int, exc: OSError):
        what = {errno.EADDRINUSE: "the port is already in use",
                errno.EACCES: "permission denied (ports below 1024 need privileges)",
                errno.EADDRNOTAVAIL: "no such local address"}.get(exc.errno, str(exc))
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        super().__init__(f"cannot listen on {proto} {shown}: {what}")
        self.proto, self.host, self.port, self.errno = proto, host, port, exc.errno
