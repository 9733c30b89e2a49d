"""`health.passive_fall` through a real `python -m dynproxy` and real backends: a
refused backend goes down after exactly passive_fall failed connections, a success
in live traffic resets the count, and with 0 traffic never marks a member down.

One worker, one member (`default -> forward(t)`): each connection tries that member
once, so each refused connection is exactly one live-traffic failure.
"""

from __future__ import annotations

import socket
import threading

import pytest


class Toggle:
    """A backend on a fixed port: `down()` (bound, not listening: connects are refused
    at once) or `up()` (listening; greets `backend=t`)."""

    def __init__(self):
        self.sock = self._bound(0)
        self.port = self.sock.getsockname()[1]
        self.address = f"127.0.0.1:{self.port}"

    @staticmethod
    def _bound(port: int) -> socket.socket:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        return sock

    def up(self) -> None:
        self.sock.listen(16)
        threading.Thread(target=self._accept, args=(self.sock,), daemon=True).start()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"backend=t\n")

    def down(self) -> None:
        self.close()
        self.sock = self._bound(self.port)

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        except OSError:
            pass
        self.sock.close()


@pytest.fixture
def toggle():
    t = Toggle()
    yield t
    t.close()


def start(proxy, proxy_config, backend: Toggle, passive_fall: int):
    config = proxy_config() + f"health:\n  passive_fall: {passive_fall}\n"
    return proxy(f"backend t {backend.address}\ndefault -> forward(t)\n", config=config,
                 udp=False)


def through(p, testkit) -> tuple[bytes, str]:
    """One connection: (what the client got, the access line's end)."""
    with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as sock:
        ends = sock.getsockname(), sock.getpeername()
        got = sock.makefile("rb").readline()
    return got, testkit.access_line_of(p, ends)["end"]


def health_of(p, backend: str) -> list[float]:
    """Values of the proxy_backend_health samples of `backend` (none: never published)."""
    out = []
    for line in p.metrics().splitlines():
        head, _, value = line.rpartition(" ")
        if head.startswith("proxy_backend_health{") and f'backend="{backend}"' in head:
            out.append(float(value))
    return out


def went_down(p) -> bool:
    return "backend t (127.0.0.1:" in p.logs() and " is down: " in p.logs()


def test_a_refused_backend_goes_down_after_exactly_passive_fall_failures(
        proxy, proxy_config, toggle, testkit):
    p = start(proxy, proxy_config, toggle, passive_fall=4)
    for _ in range(3):
        assert through(p, testkit) == (b"", "connect_failed")
    assert not went_down(p)
    assert through(p, testkit) == (b"", "connect_failed")  # the 4th: down
    assert went_down(p)
    assert "4 consecutive failures in live traffic" in p.logs()
    assert health_of(p, "t") == [0.0]
    # down (resting): not tried again, so no 5th failure
    assert through(p, testkit) == (b"", "no_backend")
    assert p.metric("proxy_errors_total", reason="connect_failed") == 4


def test_a_success_in_live_traffic_resets_the_count(proxy, proxy_config, toggle, testkit):
    p = start(proxy, proxy_config, toggle, passive_fall=3)
    ends = [through(p, testkit)[1] for _ in range(2)]
    toggle.up()
    assert through(p, testkit) == (b"backend=t\n", "closed")
    toggle.down()
    ends += [through(p, testkit)[1] for _ in range(2)]
    assert ends == ["connect_failed"] * 4 and not went_down(p)  # 2, success, 2
    assert through(p, testkit)[1] == "connect_failed"  # 3 in a row now
    assert went_down(p)
    assert through(p, testkit)[1] == "no_backend"


def test_zero_never_marks_a_member_down_by_traffic(proxy, proxy_config, toggle, testkit):
    p = start(proxy, proxy_config, toggle, passive_fall=0)
    for _ in range(8):
        assert through(p, testkit) == (b"", "connect_failed")  # tried every time
    assert p.metric("proxy_errors_total", reason="connect_failed") == 8  # reported
    assert not went_down(p)
    assert 0.0 not in health_of(p, "t")  # never shown down
    toggle.up()
    assert through(p, testkit) == (b"backend=t\n", "closed")
