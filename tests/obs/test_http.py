"""Tests for dynproxy.obs.http: real sockets on loopback, gevent sockets as the client."""

import errno
import json
import logging
import os

import pytest
from gevent import socket
from prometheus_client.parser import text_string_to_metric_families

from dynproxy.obs.http import start_http
from dynproxy.obs.metrics import init_metrics


def request(port: int, path: str, method: str = "GET", host: str = "127.0.0.1"):
    """One HTTP/1.0 exchange; returns (status, headers dict, body)."""
    sock = socket.create_connection((host, port), timeout=5)
    try:
        sock.sendall(f"{method} {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in header_lines)
    return int(status_line.split()[1]), {k.lower(): v for k, v in headers.items()}, body


class Proxy:
    """Stand-in for the caller: a mutable state and a backends view."""

    def __init__(self):
        self.state = "serving"
        self.backends = {"web": {"members": [{"name": "web-1", "healthy": True}]}}

    def backends_fn(self):
        if self.backends is None:
            raise RuntimeError("view broken")
        return self.backends


@pytest.fixture
def proxy():
    return Proxy()


@pytest.fixture
def served(proxy):
    metrics = init_metrics(None)
    server = start_http(("127.0.0.1", 0), metrics, lambda: proxy.state, proxy.backends_fn)
    yield server.server_port, metrics
    server.stop(timeout=1)


def counter(body: bytes, name: str, **labels) -> float:
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name == name and s.labels == labels:
                return s.value
    raise AssertionError(f"{name} {labels} not in exposition")


def test_healthz_ok_while_serving_and_reloading(served, proxy):
    port, _ = served
    assert request(port, "/healthz")[::2] == (200, b"ok\n")
    proxy.state = "reloading"
    assert request(port, "/healthz")[::2] == (200, b"ok\n")


@pytest.mark.parametrize("state", ["draining", "stopping", "starting"])
def test_healthz_503_with_the_state_name(served, proxy, state):
    port, _ = served
    proxy.state = state
    assert request(port, "/healthz")[::2] == (503, f"{state}\n".encode())


def test_metrics_serves_prometheus_text(served):
    port, metrics = served
    metrics.connections_total.labels("tcp", "main").inc(5)
    status, headers, body = request(port, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    assert counter(body, "proxy_connections_total", proto="tcp", listener="main") == 5


def test_backends_serves_the_callers_json(served, proxy):
    port, _ = served
    status, headers, body = request(port, "/backends")
    assert (status, headers["content-type"]) == (200, "application/json")
    assert json.loads(body) == proxy.backends


def test_a_failing_callable_answers_500_and_is_logged(served, proxy, caplog):
    port, _ = served
    proxy.backends = None
    with caplog.at_level(logging.ERROR, logger="dynproxy.obs.http"):
        status, _, body = request(port, "/backends")
    assert status == 500 and b"see the proxy log" in body
    (record,) = [r for r in caplog.records if r.name == "dynproxy.obs.http"]
    assert record.getMessage() == "monitoring endpoint /backends failed"
    assert "view broken" in str(record.exc_info[1])


def test_unknown_path_404_wrong_method_405_head_has_no_body(served):
    port, _ = served
    assert request(port, "/nope")[0] == 404
    assert request(port, "/metrics", method="POST")[0] == 405
    status, headers, body = request(port, "/healthz", method="HEAD")
    assert (status, headers["content-length"], body) == (200, "3", b"")


def test_without_metrics_or_backends_those_routes_are_absent(proxy):
    server = start_http(("127.0.0.1", 0), None, lambda: proxy.state)
    try:
        assert request(server.server_port, "/metrics")[0] == 404
        assert request(server.server_port, "/backends")[0] == 404
        assert request(server.server_port, "/healthz")[0] == 200
    finally:
        server.stop(timeout=1)


def test_ipv6_bind(proxy):
    server = start_http(("[::1]", 0), None, lambda: proxy.state)
    try:
        assert request(server.server_port, "/healthz", host="::1")[::2] == (200, b"ok\n")
    finally:
        server.stop(timeout=1)


def test_port_in_use_says_which_and_what_to_do(served, proxy):
    port, _ = served
    with pytest.raises(OSError) as caught:
        start_http(("127.0.0.1", port), None, lambda: proxy.state)
    assert caught.value.errno == errno.EADDRINUSE
    assert str(caught.value) == (
        f"cannot serve /metrics, /healthz and /backends on 127.0.0.1:{port}: the address is "
        f"already in use by another process (`ss -ltnp 'sport = :{port}'` shows which); stop "
        "that process, choose another address (--metrics-bind HOST:PORT, or "
        "monitoring.metrics_bind in the config), or turn the endpoint off "
        "(monitoring.enable_metrics: false)")


def test_an_address_not_of_this_host_says_so(proxy):
    with pytest.raises(OSError) as caught:
        start_http(("192.0.2.1", 9999), None, lambda: proxy.state)  # TEST-NET-1
    assert str(caught.value).startswith("cannot serve /metrics, /healthz and /backends on "
                                        "192.0.2.1:9999: '192.0.2.1' is not an address of "
                                        "this host; choose another address (--metrics-bind")


def test_master_serves_the_aggregate_of_forked_workers(tmp_path, proxy):
    metrics = init_metrics(str(tmp_path), wipe=True)
    pids = [_fork_worker(metrics, n) for n in (2, 5)]
    for pid in pids:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    server = start_http(("127.0.0.1", 0), metrics, lambda: proxy.state)
    try:
        body = request(server.server_port, "/metrics")[2]
    finally:
        server.stop(timeout=1)
    assert counter(body, "proxy_bytes_transferred_total", direction="up", proto="tcp") == 7
    assert counter(body, "proxy_udp_sessions", listener="dns") == 7


def _fork_worker(metrics, n: int) -> int:
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            metrics.bytes_transferred_total.labels("up", "tcp").inc(n)
            metrics.udp_sessions.labels("dns").inc(n)
            code = 0
        finally:
            os._exit(code)
    return pid
