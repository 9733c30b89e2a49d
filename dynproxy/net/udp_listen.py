"""Opening a UDP listener socket (the TCP side's is net/tcp_listen.py)."""

from __future__ import annotations

import socket

from dynproxy.net.tcp_listen import bound_socket

__all__ = ["open_udp_socket"]


def open_udp_socket(host: str, port: int, reuse_port: bool) -> socket.socket:
    """A bound, non-blocking UDP socket (see tcp_listen.bound_socket: no SO_REUSEADDR)."""
    return bound_socket("udp", host, port, reuse_port, lambda sock: sock.setblocking(False))
