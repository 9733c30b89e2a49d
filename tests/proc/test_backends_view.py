"""GET /backends on the master shows the open connections its workers carry."""

import json
import socket
import time


def backends_view(p) -> dict:
    status, body = p.http("/backends")
    assert status == 200
    return json.loads(body)


def test_backends_view_counts_connections_held_by_every_worker(proxy, backends):
    a = backends("a")
    p = proxy(f"backend a {a.address}\npool web {{ member a }}\ndefault -> forward(web)\n",
              config="server:\n  workers: 2\nshutdown:\n  drain_timeout: 0s\n", udp=False)
    held = [socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) for _ in range(6)]
    for sock in held:
        assert sock.makefile("rb").readline() == b"backend=a\n"
    deadline = time.monotonic() + 5
    while True:
        view = backends_view(p)
        shown = view["pools"]["web"]["members"][0]["active_connections"]
        if shown == 6 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert shown == 6 and view["backends"]["a"]["active_connections"] == 6
    for sock in held:
        sock.close()
    deadline = time.monotonic() + 5
    while backends_view(p)["backends"]["a"]["active_connections"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert backends_view(p)["backends"]["a"]["active_connections"] == 0
