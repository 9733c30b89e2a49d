"""Shared setup for the gevent I/O tests: monkey-patch before anything opens a socket.

The tests under tests/net drive real sockets from several greenlets at once, which
only interleave when the stdlib socket module is gevent's. Patching here (the first
module pytest imports from this directory) keeps pure-logic test directories untouched
when they run on their own.
"""

from gevent import monkey

monkey.patch_all()


# In-process proxies --------------------------------------------------------------------
# Imports after the patch: they open nothing, but gevent must patch first.
import io  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402

import gevent  # noqa: E402
import pytest  # noqa: E402

from dynproxy.net.state import Serving  # noqa: E402
from dynproxy.net.tcp import TcpProxy, open_tcp_listener  # noqa: E402
from dynproxy.net.udp import UdpProxy  # noqa: E402
from dynproxy.net.udp_listen import open_udp_socket  # noqa: E402
from dynproxy.obs import log as obs_log  # noqa: E402
from dynproxy.obs.metrics import init_metrics  # noqa: E402
from dynproxy.proc.build import Sources, build_snapshot  # noqa: E402


def wait_until(condition, timeout: float = 5.0) -> float:
    """Seconds it took `condition` to hold (fails the test past `timeout`)."""
    began = time.monotonic()
    while not condition():
        assert time.monotonic() - began < timeout, f"{condition} not reached in {timeout}s"
        gevent.sleep(0.01)
    return time.monotonic() - began


class InProcess:
    """TCP and UDP listeners in this process on `rules` and the config text `config`,
    whose snapshot is built as a worker builds it; their metrics and JSON log lines.
    `proxy` is the first TCP listener made."""

    def __init__(self, tmp_path, rules: str, config: str = "") -> None:
        (tmp_path / "main.rules").write_text(rules)
        (tmp_path / "dynproxy.yaml").write_text(config)
        self.log = io.StringIO()
        obs_log.setup_logging("info", "json", stream=self.log)
        self.metrics = init_metrics(None)
        self.serving = Serving(build_snapshot(Sources(str(tmp_path / "main.rules"),
                                                      str(tmp_path / "dynproxy.yaml"), {})))
        self.proxies: list = []
        self.proxy: TcpProxy | None = None

    def tcp(self, max_connections: int = 100) -> TcpProxy:
        proxy = TcpProxy(open_tcp_listener("127.0.0.1", 0, 64, False), "t", self.serving,
                         self.metrics, max_connections)
        proxy.start()
        self.proxies.append(proxy)
        self.proxy = self.proxy or proxy
        return proxy

    def udp(self, session_idle: float = 30.0, max_sessions: int = 100) -> UdpProxy:
        proxy = UdpProxy(open_udp_socket("127.0.0.1", 0, False), "u", self.serving,
                         self.metrics, session_idle, max_sessions)
        proxy.start()
        self.proxies.append(proxy)
        return proxy

    wait_until = staticmethod(wait_until)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.proxy.port), timeout=timeout)

    def sample(self, name: str, **labels) -> float | None:
        """The sample's value; None when it has never been set."""
        return self.metrics.registry.get_sample_value(name, labels)

    def value(self, name: str, **labels) -> float:
        """The sample's value, 0.0 when it has never been set (a counter not yet moved)."""
        return self.sample(name, **labels) or 0.0

    def records(self) -> list[dict]:
        return [json.loads(x) for x in self.log.getvalue().splitlines() if x.startswith("{")]

    def access_lines(self) -> list[dict]:
        return [r for r in self.records() if r.get("logger") == obs_log.ACCESS_LOGGER]

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.stop_accepting()
            proxy.kill_all(timeout=1)
        logging.getLogger().removeHandler(obs_log._installed.handler)  # none of ours left
        obs_log._installed.handler = None
        logging.getLogger(obs_log.ACCESS_LOGGER).setLevel(logging.NOTSET)


@pytest.fixture
def in_process(tmp_path):
    """make(rules, config="") -> InProcess, closed at the end of the test."""
    made: list[InProcess] = []

    def make(rules: str, config: str = "") -> InProcess:
        made.append(InProcess(tmp_path, rules, config))
        return made[-1]

    yield make
    for harness in made:
        harness.close()

