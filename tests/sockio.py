"""Reading from a test's client socket: one line, an exact count, or all to EOF.

Importable from every test module (pytest `pythonpath = ["tests"]`). Each returns what
it got; on an early EOF, less than asked: the caller's comparison says what was wrong.
"""

from __future__ import annotations

import socket


def recv_line(sock: socket.socket) -> bytes:
    """Up to and including the first newline (one byte at a time: nothing after it is
    taken from the socket), or what came before EOF."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_exact(sock: socket.socket, count: int) -> bytes:
    """`count` bytes, or fewer if the stream ends first."""
    buf = bytearray()
    while len(buf) < count:
        chunk = sock.recv(count - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


def recv_to_eof(sock: socket.socket) -> bytes:
    """Everything until the peer closes its side."""
    buf = bytearray()
    while chunk := sock.recv(1 << 20):
        buf += chunk
    return bytes(buf)
