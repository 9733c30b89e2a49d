"""One proxied TCP connection's state (ConnStats): its sockets until a relay owns them,
what its access-log line and metrics will say, the bytes already counted while it is
open, and the closer that `redis.close_removed` calls. TcpProxy (net/tcp.py) drives it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from dynproxy.net.relay_flows import READ
from dynproxy.net.relay_pools import WATCHERS

if TYPE_CHECKING:
    from dynproxy.net.relay import Relay
    from dynproxy.net.tcp import TcpProxy

__all__ = ["ConnStats"]


class ConnStats:
    """One connection: its sockets until the relay owns them, and what the access log
    and metrics report about it (terminate.py fills in end, backend, up, down).
    `counted_up`/`counted_down`: bytes already added to the byte counters while open."""

    __slots__ = ("proxy", "sock", "addr", "reader", "upstream", "member", "relay", "start",
                 "sni", "alpn", "rule", "backend", "header", "up", "down", "end",
                 "counted_up", "counted_down")

    def __init__(self, proxy: TcpProxy, sock, addr) -> None:
        self.proxy, self.sock, self.addr = proxy, sock, addr
        self.start = time.monotonic()
        self.reader = self.upstream = self.member = self.relay = None
        self.sni = self.rule = self.backend = None
        self.alpn = ()
        self.header = self.up = self.down = self.counted_up = self.counted_down = 0
        self.end = "closed"

    def uncounted(self, moved_up: int, moved_down: int) -> tuple[int, int]:
        """Bytes moved since the last count, now counted (the PROXY header, which the
        proxy sent first, is not the client's)."""
        up = moved_up - self.header - self.counted_up
        down = moved_down - self.counted_down
        up = up if up > 0 else 0
        down = down if down > 0 else 0
        self.counted_up += up
        self.counted_down += down
        return up, down

    def reader_watcher(self):
        reader = self.reader
        if reader is None:
            reader = self.reader = WATCHERS.take(self.proxy.loop, self.sock.fileno(), READ)
        return reader

    def close(self) -> None:
        """Close what the relay did not take over (the handshake ended early)."""
        if self.reader is not None:
            WATCHERS.give(self.reader)
            self.reader = None
        if self.upstream is not None:
            self.upstream.close()
            self.upstream = None
        self.sock.close()

    def __call__(self) -> None:
        """Close this connection now (its backend left Redis with redis.close_removed on;
        it is one of `member.connections`): a relay in the hub ends at once, one in a
        worker greenlet (TLS to the backend) fails on its closed socket and ends."""
        relay = self.relay
        if relay is not None:
            relay.abort()
            self.relayed(relay)
        else:
            self.sock.close()

    def relayed(self, relay: Relay) -> None:
        """The relay ended (it closed both sockets): report, free the slot."""
        proxy = self.proxy
        self.relay = None  # relay -> on_done -> us -> relay: no cycle left behind
        try:
            proxy.relays.discard(self)
            self.up = max(0, relay.up.moved - self.header)  # the header is ours
            self.down, self.end = relay.down.moved, relay.end
            if relay.end == "reset":
                proxy.metrics.errors_total.labels("reset").inc()
        finally:
            proxy.finish(self)
