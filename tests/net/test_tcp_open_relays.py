"""Open relays seen from the TCP path, in this process with real sockets: the bytes of a
long-lived connection reach the byte counters while it is open (once a second) and the
totals at close are exact; a connection whose flows get no pipe (out of descriptors)
copies instead, is counted as `fd_limit`, and moves every byte.
"""

from __future__ import annotations

import errno
import os
import socket
import ssl

import gevent
import pytest

from dynproxy.net import relay_pools
from dynproxy.net.relay_pools import PIPES

from sockio import recv_exact

GREETING = b"backend=web\n"  # what the test backend says first, then it echoes


CONFIG = "server:\n  timeouts:\n    idle: 30s\n"


def counted_bytes(s) -> tuple[float, float]:
    """proxy_bytes_transferred_total{proto="tcp"}: (up, down)."""
    return (s.value("proxy_bytes_transferred_total", direction="up", proto="tcp"),
            s.value("proxy_bytes_transferred_total", direction="down", proto="tcp"))


@pytest.fixture
def site(in_process, backends):
    """start(backend_options="") -> InProcess with one TCP listener."""
    web = backends("web")

    def start(backend_options: str = ""):
        s = in_process(f"backend web {web.address}{backend_options}\n"
                       "default -> forward(web)\n", CONFIG)
        s.tcp()
        return s
    return start


def echo(sock: socket.socket, data: bytes) -> None:
    """Send `data` through the proxy to the echoing backend and read it back."""
    sender = gevent.spawn(sock.sendall, data)
    assert recv_exact(sock, len(data)) == data
    sender.get(timeout=10)


def test_bytes_of_an_open_connection_are_counted_while_it_lasts_and_exactly_at_close(site):
    s = site()
    sock = s.connect(timeout=10)
    assert recv_exact(sock, len(GREETING)) == GREETING
    first = os.urandom(300_000)  # bulk: the flows turn to splice
    echo(sock, first)
    # still open, nothing ended: the counters show the bytes within about a second
    took = s.wait_until(lambda: counted_bytes(s) == (len(first), len(GREETING) + len(first)))
    assert took < 2.0
    assert len(s.proxy.relays) == 1 and s.access_lines() == []
    assert s.value("proxy_requests_total", proto="tcp", result="closed") == 0
    second = b"q" * 1000  # a small message: copied
    echo(sock, second)
    s.wait_until(lambda: counted_bytes(s)[0] == len(first) + len(second))
    third = os.urandom(70_000)  # moved after the last reading, counted by the close
    echo(sock, third)
    sock.close()
    s.wait_until(lambda: s.access_lines())
    up = len(first) + len(second) + len(third)
    [line] = s.access_lines()
    assert (line["bytes_up"], line["bytes_down"], line["end"]) == (
        up, len(GREETING) + up, "closed")
    assert counted_bytes(s) == (up, len(GREETING) + up)  # nothing counted twice
    gevent.sleep(1.2)  # a reading after the close adds nothing, and then stops ticking
    assert counted_bytes(s) == (up, len(GREETING) + up)
    assert not s.proxy._open_bytes.timer.active


def test_the_proxy_header_is_never_counted_while_open(site):
    s = site(" send-proxy v1")
    sock = s.connect(timeout=10)
    data = os.urandom(100_000)
    gevent.spawn(sock.sendall, data).get(timeout=10)
    s.wait_until(lambda: counted_bytes(s)[0] == len(data))  # the header went up too: not counted
    gevent.sleep(1.2)  # another reading: still only the client's bytes
    assert counted_bytes(s)[0] == len(data)
    sock.close()
    s.wait_until(lambda: s.access_lines())
    [line] = s.access_lines()
    assert line["bytes_up"] == len(data)
    assert counted_bytes(s) == (line["bytes_up"], line["bytes_down"])


def test_many_open_connections_are_each_counted_once(site):
    s = site()
    socks = [s.connect(timeout=10) for _ in range(20)]
    for sock in socks:
        assert recv_exact(sock, len(GREETING)) == GREETING
    sizes = [1000 * (i + 1) for i in range(len(socks))]
    for sock, size in zip(socks, sizes, strict=True):
        echo(sock, b"z" * size)
    total = sum(sizes)
    s.wait_until(lambda: counted_bytes(s) == (total, len(GREETING) * len(socks) + total))
    for sock, size in zip(socks[::2], sizes[::2], strict=True):  # half of them move more, then close
        echo(sock, b"y" * size)
        sock.close()
    total += sum(sizes[::2])
    for sock in socks[1::2]:
        sock.close()
    s.wait_until(lambda: len(s.access_lines()) == len(socks))
    assert counted_bytes(s) == (total, len(GREETING) * len(socks) + total)
    assert counted_bytes(s) == tuple(sum(line[k] for line in s.access_lines())
                              for k in ("bytes_up", "bytes_down"))


@pytest.mark.parametrize("failure", [pytest.param(errno.EMFILE, id="EMFILE"),
                                     pytest.param(errno.ENFILE, id="ENFILE")])
def test_a_connection_that_gets_no_pipe_copies_instead_and_is_counted(site, monkeypatch,
                                                                      failure):
    s = site()

    def pipe2_refused(flags):
        raise OSError(failure, os.strerror(failure))

    PIPES.close_idle()  # nothing to reuse: the bulk reads need a new pipe
    monkeypatch.setattr(relay_pools.os, "pipe2", pipe2_refused)
    created = PIPES.created
    sock = s.connect(timeout=10)
    assert recv_exact(sock, len(GREETING)) == GREETING
    data = os.urandom(1 << 20)  # bulk both ways: each flow would turn to splice
    echo(sock, data)
    sock.close()
    s.wait_until(lambda: s.access_lines())
    [line] = s.access_lines()
    assert (line["bytes_up"], line["bytes_down"], line["end"]) == (
        len(data), len(GREETING) + len(data), "closed")
    assert PIPES.created == created and PIPES.lent == 0
    assert s.value("proxy_errors_total", reason="fd_limit") >= 1


def test_bytes_of_an_open_tls_terminated_connection_are_counted_while_it_lasts(
        in_process, backends, tls_certs):
    web = backends("web")
    default = tls_certs["default"]
    s = in_process(f"backend web {web.address}\ndefault -> terminate tls then forward(web)\n",
                   CONFIG + f"tls:\n  cert_path: {default.cert_path}\n"
                            f"  key_path: {default.key_path}\n")
    s.tcp()
    ctx = ssl.create_default_context(cafile=str(tls_certs["ca"].cert_path))
    ctx.check_hostname = False
    with ctx.wrap_socket(s.connect(timeout=10), server_hostname="any.example.org") as tls:
        assert recv_exact(tls, len(GREETING)) == GREETING
        data = os.urandom(100_000)
        echo(tls, data)
        # plaintext bytes, while the connection is open and relayed in its greenlet
        s.wait_until(lambda: counted_bytes(s) == (len(data), len(GREETING) + len(data)))
        assert s.access_lines() == []
        echo(tls, b"more")
    s.wait_until(lambda: s.access_lines())
    [line] = s.access_lines()
    assert counted_bytes(s) == (line["bytes_up"], line["bytes_down"]) == \
        (len(data) + 4, len(GREETING) + len(data) + 4)  # nothing counted twice
    assert s.proxy.streams == {}
