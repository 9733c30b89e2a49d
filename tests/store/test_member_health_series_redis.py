"""proxy_backend_health for Redis members through a real `python -m dynproxy` (master
and 2 workers) and a real redis-server: a member that joins gets its series at once
(1: no active checks), passive health can set it to 0, a member that leaves loses it,
and one that comes back starts at 1 again, not at the value it had when it left."""

from __future__ import annotations

import json
import socket
import time

from prometheus_client.parser import text_string_to_metric_families

WAIT = 10.0
RULES = 'pool web { members from redis "web-*" }\ndefault -> forward(web)\n'


def health_series(proxy) -> dict[tuple[str, str], float]:
    return {(s.labels["pool"], s.labels["backend"]): s.value
            for family in text_string_to_metric_families(proxy.metrics())
            if family.name == "proxy_backend_health" for s in family.samples}


def wait_series(proxy, expected: dict) -> None:
    deadline = time.monotonic() + WAIT
    while (got := health_series(proxy)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == expected, proxy.logs()[-4000:]


def stored(address: str) -> str:
    return json.dumps({"address": address, "weight": 1, "healthy": True,
                       "last_check": None, "metadata": {}})


def test_redis_members_get_a_series_and_lose_it_when_they_leave(redis_server, prefix, proxy,
                                                                backends, proxy_config):
    r = redis_server.client()
    one, two = backends("web-1"), backends("web-2")
    with socket.socket() as refusing:  # bound, never listening: connects are refused
        refusing.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{refusing.getsockname()[1]}"
        r.set(f"{prefix}backends:web-1", stored(one.address))
        config = (proxy_config() + "health:\n  passive_fall: 1\n"
                  f"redis:\n  url: {redis_server.url}\n  key_prefix: '{prefix}'\n"
                  "  rescan_interval: 200ms\n")
        p = proxy(RULES, config=config, udp=False, extra_args=("--workers", "2"))
        wait_series(p, {("web", "web-1"): 1})
        r.set(f"{prefix}backends:web-3", stored(dead))
        wait_series(p, {("web", "web-1"): 1, ("web", "web-3"): 1})

        deadline = time.monotonic() + WAIT  # live traffic finds web-3 refusing
        while health_series(p).get(("web", "web-3")) != 0 and time.monotonic() < deadline:
            with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as conn:
                assert conn.makefile("rb").readline() == b"backend=web-1\n"
        assert health_series(p)[("web", "web-3")] == 0

        r.delete(f"{prefix}backends:web-3")
        wait_series(p, {("web", "web-1"): 1})
    r.set(f"{prefix}backends:web-3", stored(two.address))  # back, on a live address
    wait_series(p, {("web", "web-1"): 1, ("web", "web-3"): 1})
