"""Before starting workers: is every address free, and if not, who holds it?

Workers bind with SO_REUSEPORT, and the kernel lets any process of the same user join
a port that way: a second dynproxy started by mistake would silently take half the
traffic of the first. So the master first binds each address once *without*
SO_REUSEPORT, which fails when anything at all holds it, and then names the holder
from /proc/net/{tcp,udp}[6] and /proc/*/fd (when this user may see it).
"""

from __future__ import annotations

import errno
import os

from dynproxy.net.tcp_listen import BindError, bound_socket

__all__ = ["check_free", "holder_of"]

_LISTEN, _UDP_BOUND = "0A", "07"


def check_free(proto: str, host: str, port: int) -> None:
    """Raise BindError (with the holder named when known) unless `host:port` is free.
    The probe binds as the listeners do (TIME_WAIT leftovers do not count), but
    without SO_REUSEPORT."""
    try:
        bound_socket(proto, host, port, False, lambda probe: None).close()
    except BindError as error:
        if error.errno == errno.EADDRINUSE:
            error.args = (f"{error.args[0]}{_held_by(proto, port)}",)
        raise


def _held_by(proto: str, port: int) -> str:
    holder = holder_of(proto, port)
    if holder is None:
        return " (by a process this user cannot see)"
    pid, cmdline = holder
    return f" (held by pid {pid}: {cmdline})"


def holder_of(proto: str, port: int) -> tuple[int, str] | None:
    """(pid, command line) of a process with a socket bound to `port`, if visible."""
    inodes = _socket_inodes(proto, port)
    if not inodes:
        return None
    for pid in _pids():
        if _has_socket(pid, inodes):
            return pid, _cmdline(pid)
    return None


def _socket_inodes(proto: str, port: int) -> set[str]:
    want_state = _LISTEN if proto == "tcp" else _UDP_BOUND
    inodes: set[str] = set()
    for table in (f"/proc/net/{proto}", f"/proc/net/{proto}6"):
        try:
            with open(table, encoding="ascii") as file:
                lines = file.read().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 9 and fields[3] == want_state and \
                    int(fields[1].rsplit(":", 1)[1], 16) == port:
                inodes.add(fields[9])
    inodes.discard("0")
    return inodes


def _pids() -> list[int]:
    return sorted(int(name) for name in os.listdir("/proc") if name.isdigit())


def _has_socket(pid: int, inodes: set[str]) -> bool:
    wanted = {f"socket:[{inode}]" for inode in inodes}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return False  # gone, or not ours to look at
    for fd in fds:
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in wanted:
                return True
        except OSError:
            continue
    return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            raw = file.read(4096)
    except OSError:
        return "?"
    return raw.replace(b"\0", b" ").decode(errors="replace").strip() or "?"
