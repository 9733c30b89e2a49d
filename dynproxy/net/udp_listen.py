"""Opening a UDP listener socket (the TCP side's is net/tcp_listen.py)."""

from __future__ import annotations

import socket

from dynproxy.net.tcp_listen import BindError

__all__ = ["open_udp_socket"]


def open_udp_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound, non-blocking UDP socket; IPv6 literals get an AF_INET6 socket (v6 only).

    No SO_REUSEADDR: for UDP it would let a second process bind the same port and
    silently take its datagrams, hiding the "port in use" error.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((host or "0.0.0.0", port))
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError("udp", host, port, exc) from None
    return sock
