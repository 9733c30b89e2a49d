"""proxy_backend_health through a real `python -m dynproxy` (master and 2 workers):
every pool member has a series, with active checks or without (1 while up; passive
health in live traffic can set 0), a backend in no pool has one under pool "-", and a
member that leaves its pool loses its series (no stale value left behind by a worker).
"""

from __future__ import annotations

import signal
import socket
import time

from prometheus_client.parser import text_string_to_metric_families

WAIT = 15.0


def health_series(proxy) -> dict[tuple[str, str], float]:
    """(pool, backend) -> value of every proxy_backend_health sample on /metrics."""
    return {(s.labels["pool"], s.labels["backend"]): s.value
            for family in text_string_to_metric_families(proxy.metrics())
            if family.name == "proxy_backend_health" for s in family.samples}


def wait_series(proxy, expected: dict) -> dict:
    deadline = time.monotonic() + WAIT
    while (got := health_series(proxy)) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert got == expected, proxy.logs()[-4000:]
    return got


def dead_address() -> str:
    with socket.socket() as s:  # bound, never listening: connects are refused at once
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


def rules(a, b, c, solo, dead: str | None) -> str:
    web = "member a\n  member b" + ("\n  member dead" if dead else "")
    return "\n".join([
        f"backend a {a.address}", f"backend b {b.address}", f"backend c {c.address}",
        f"backend solo {solo.address}", *([f"backend dead {dead}"] if dead else []),
        f"pool web {{\n  {web}\n}}",
        "pool checked {\n  member c\n  health tcp every 200ms timeout 100ms rise 1 fall 1\n}",
        'sni exact "solo.test" -> forward(solo)',
        'sni exact "checked.test" -> forward(checked)',
        "default -> forward(web)", ""])


def test_every_member_has_a_series_and_a_member_that_leaves_loses_it(proxy, backends,
                                                                     proxy_config):
    a, b, c, solo = (backends(n) for n in ("a", "b", "c", "solo"))
    config = proxy_config() + "health:\n  passive_fall: 1\n"
    p = proxy(rules(a, b, c, solo, dead_address()), config=config, udp=False,
              extra_args=("--workers", "2"))
    # no health checks on web, none on solo: up all the same; c is checked and up
    wait_series(p, {("web", "a"): 1, ("web", "b"): 1, ("web", "dead"): 1,
                    ("checked", "c"): 1, ("-", "solo"): 1})

    # live traffic finds `dead` refusing (each worker in turn): passive health sets 0
    deadline = time.monotonic() + WAIT
    while health_series(p).get(("web", "dead")) != 0 and time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as conn:
            assert conn.makefile("rb").readline() in (b"backend=a\n", b"backend=b\n")
    assert health_series(p)[("web", "dead")] == 0

    # `dead` and `b` leave web (b stays declared, in no pool now); c's check is gone
    p.rules_path.write_text(rules(a, b, c, solo, None).replace("  member b\n", ""))
    p.signal(signal.SIGHUP)
    wait_series(p, {("web", "a"): 1, ("-", "b"): 1, ("checked", "c"): 1, ("-", "solo"): 1})
    assert 'backend="dead"' not in p.metrics()  # not even under another label


def test_a_member_a_reload_brings_back_starts_up_not_with_its_old_value(proxy, backends,
                                                                       proxy_config):
    a, b, c, solo = (backends(n) for n in ("a", "b", "c", "solo"))
    dead = dead_address()
    config = proxy_config() + "health:\n  passive_fall: 1\n"
    p = proxy(rules(a, b, c, solo, dead), config=config, udp=False,
              extra_args=("--workers", "2"))
    deadline = time.monotonic() + WAIT  # both workers find `dead` refusing: 0
    while health_series(p).get(("web", "dead")) != 0 and time.monotonic() < deadline:
        with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as conn:
            conn.makefile("rb").readline()
    for _ in range(20):  # and more, so that every worker has seen it refuse
        with socket.create_connection(("127.0.0.1", p.tcp_port), timeout=5) as conn:
            conn.makefile("rb").readline()
    assert health_series(p)[("web", "dead")] == 0

    p.rules_path.write_text(rules(a, b, c, solo, None))  # dead leaves web ...
    p.signal(signal.SIGHUP)
    wait_series(p, {("web", "a"): 1, ("web", "b"): 1, ("checked", "c"): 1, ("-", "solo"): 1})
    p.rules_path.write_text(rules(a, b, c, solo, dead))  # ... and comes back, a new member
    p.signal(signal.SIGHUP)
    wait_series(p, {("web", "a"): 1, ("web", "b"): 1, ("web", "dead"): 1,
                    ("checked", "c"): 1, ("-", "solo"): 1})
