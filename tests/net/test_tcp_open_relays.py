"""Open relays seen from the TCP path, in this process with real sockets: the bytes of a
long-lived connection reach the byte counters while it is open (once a second) and the
totals at close are exact; a connection whose flows get no pipe (out of descriptors)
copies instead, is counted as `fd_limit`, and moves every byte.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import socket
import time

import gevent
import pytest

from dynproxy.net import relay_pools
from dynproxy.net.relay_pools import PIPES
from dynproxy.net.state import Serving
from dynproxy.net.tcp import TcpProxy, open_tcp_listener
from dynproxy.obs import log as obs_log
from dynproxy.obs.log import setup_logging
from dynproxy.obs.metrics import init_metrics
from dynproxy.proc.build import Sources, build_snapshot

GREETING = b"backend=web\n"  # what the test backend says first, then it echoes


class InProcess:
    """A TcpProxy on a free port serving `rules`, its metrics, and its access log."""

    def __init__(self, tmp_path, rules: str) -> None:
        (tmp_path / "main.rules").write_text(rules)
        (tmp_path / "dynproxy.yaml").write_text("server:\n  timeouts:\n    idle: 30s\n")
        self.log = io.StringIO()
        setup_logging("info", "json", stream=self.log)
        self.metrics = init_metrics(None)
        snap = build_snapshot(Sources(str(tmp_path / "main.rules"),
                                      str(tmp_path / "dynproxy.yaml"), {}))
        self.proxy = TcpProxy(open_tcp_listener("127.0.0.1", 0, 64, False), "t",
                              Serving(snap), self.metrics, 100)
        self.proxy.start()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.proxy.port), timeout=10)

    def sample(self, name: str, **labels) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    def bytes(self) -> tuple[float, float]:
        """proxy_bytes_transferred_total{proto="tcp"}: (up, down)."""
        return (self.sample("proxy_bytes_transferred_total", direction="up", proto="tcp"),
                self.sample("proxy_bytes_transferred_total", direction="down", proto="tcp"))

    def access_lines(self) -> list[dict]:
        return [json.loads(x) for x in self.log.getvalue().splitlines()
                if '"dynproxy.access"' in x]

    def close(self) -> None:
        self.proxy.stop_accepting()
        self.proxy.kill_all(timeout=1)
        logging.getLogger().removeHandler(obs_log._installed.handler)
        obs_log._installed.handler = None
        logging.getLogger(obs_log.ACCESS_LOGGER).setLevel(logging.NOTSET)


@pytest.fixture
def site(tmp_path, backends):
    web = backends("web")
    made = []

    def start(backend_options: str = "") -> InProcess:
        made.append(InProcess(tmp_path, f"backend web {web.address}{backend_options}\n"
                                         "default -> forward(web)\n"))
        return made[-1]

    yield start
    for harness in made:
        harness.close()


def wait_until(condition, timeout: float = 5.0) -> float:
    """Seconds it took `condition` to hold."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, f"{condition} not reached in {timeout}s"
        gevent.sleep(0.01)
    return time.monotonic() - began


def recv_exactly(sock: socket.socket, count: int) -> bytes:
    out = bytearray()
    while len(out) < count:
        chunk = sock.recv(count - len(out))
        assert chunk, f"EOF after {len(out)} of {count} bytes"
        out += chunk
    return bytes(out)


def echo(sock: socket.socket, data: bytes) -> None:
    """Send `data` through the proxy to the echoing backend and read it back."""
    sender = gevent.spawn(sock.sendall, data)
    assert recv_exactly(sock, len(data)) == data
    sender.get(timeout=10)


def test_bytes_of_an_open_connection_are_counted_while_it_lasts_and_exactly_at_close(site):
    s = site()
    sock = s.connect()
    assert recv_exactly(sock, len(GREETING)) == GREETING
    first = os.urandom(300_000)  # bulk: the flows turn to splice
    echo(sock, first)
    # still open, nothing ended: the counters show the bytes within about a second
    took = wait_until(lambda: s.bytes() == (len(first), len(GREETING) + len(first)))
    assert took < 2.0
    assert len(s.proxy.relays) == 1 and s.access_lines() == []
    assert s.sample("proxy_requests_total", proto="tcp", result="closed") == 0
    second = b"q" * 1000  # a small message: copied
    echo(sock, second)
    wait_until(lambda: s.bytes()[0] == len(first) + len(second))
    third = os.urandom(70_000)  # moved after the last reading, counted by the close
    echo(sock, third)
    sock.close()
    wait_until(lambda: s.access_lines())
    up = len(first) + len(second) + len(third)
    [line] = s.access_lines()
    assert (line["bytes_up"], line["bytes_down"], line["end"]) == (
        up, len(GREETING) + up, "closed")
    assert s.bytes() == (up, len(GREETING) + up)  # nothing counted twice
    gevent.sleep(1.2)  # a reading after the close adds nothing, and then stops ticking
    assert s.bytes() == (up, len(GREETING) + up)
    assert not s.proxy._open_bytes.timer.active


def test_the_proxy_header_is_never_counted_while_open(site):
    s = site(" send-proxy v1")
    sock = s.connect()
    data = os.urandom(100_000)
    gevent.spawn(sock.sendall, data).get(timeout=10)
    wait_until(lambda: s.bytes()[0] == len(data))  # the header went up too: not counted
    gevent.sleep(1.2)  # another reading: still only the client's bytes
    assert s.bytes()[0] == len(data)
    sock.close()
    wait_until(lambda: s.access_lines())
    [line] = s.access_lines()
    assert line["bytes_up"] == len(data)
    assert s.bytes() == (line["bytes_up"], line["bytes_down"])


def test_many_open_connections_are_each_counted_once(site):
    s = site()
    socks = [s.connect() for _ in range(20)]
    for sock in socks:
        assert recv_exactly(sock, len(GREETING)) == GREETING
    sizes = [1000 * (i + 1) for i in range(len(socks))]
    for sock, size in zip(socks, sizes):
        echo(sock, b"z" * size)
    total = sum(sizes)
    wait_until(lambda: s.bytes() == (total, len(GREETING) * len(socks) + total))
    for sock, size in zip(socks[::2], sizes[::2]):  # half of them move more, then close
        echo(sock, b"y" * size)
        sock.close()
    total += sum(sizes[::2])
    for sock in socks[1::2]:
        sock.close()
    wait_until(lambda: len(s.access_lines()) == len(socks))
    assert s.bytes() == (total, len(GREETING) * len(socks) + total)
    assert s.bytes() == tuple(sum(line[k] for line in s.access_lines())
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
    sock = s.connect()
    assert recv_exactly(sock, len(GREETING)) == GREETING
    data = os.urandom(1 << 20)  # bulk both ways: each flow would turn to splice
    echo(sock, data)
    sock.close()
    wait_until(lambda: s.access_lines())
    [line] = s.access_lines()
    assert (line["bytes_up"], line["bytes_down"], line["end"]) == (
        len(data), len(GREETING) + len(data), "closed")
    assert PIPES.created == created and PIPES.lent == 0
    assert s.sample("proxy_errors_total", reason="fd_limit") >= 1
