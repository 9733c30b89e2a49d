"""SIGHUP to the master, with real processes: new connections take the new rules while
in-flight ones and UDP sessions keep theirs, a bad rule file changes nothing, and twenty
reloads under load lose no connection."""

from __future__ import annotations

import signal
import socket
import threading

import proc_support as s


def test_sighup_reroutes_new_connections_and_keeps_inflight_ones(proxy, backends):
    a, b = backends("a"), backends("b")
    ua, ub = s.UdpBackend("ua"), s.UdpBackend("ub")
    try:
        _reroute(proxy, a, b, ua, ub)
    finally:
        ua.stop()
        ub.stop()


def _reroute(proxy, a, b, ua, ub):
    rules = ("backend a {a}\nbackend b {b}\nbackend ua {ua}\nbackend ub {ub}\n"
             "proto udp -> forward({udp})\ndefault -> forward({tcp})\n")
    addrs = {"a": a.address, "b": b.address, "ua": ua.address, "ub": ub.address}
    p = proxy(rules.format(**addrs, udp="ua", tcp="a"), config=s.config("2s"),
              extra_args=s.WORKERS_2)
    inflight = socket.create_connection(("127.0.0.1", p.tcp_port), timeout=10)
    assert s.recv_line(inflight) == b"backend=a\n"
    session = s.udp_client()
    assert s.udp_ask(session, p.udp_port, b"one") == b"ua:one"
    p.rules_path.write_text(rules.format(**addrs, udp="ub", tcp="b"))
    p.signal(signal.SIGHUP)
    s.wait_reloaded(p, 2)
    for _ in range(20):
        assert s.greeting(p.tcp_port) == b"backend=b\n"
    payload = s.pattern(300_000, 7)
    inflight.sendall(payload)
    assert s.recv_exact(inflight, len(payload)) == payload  # still relayed, byte-exact
    inflight.close()
    assert s.udp_ask(session, p.udp_port, b"two") == b"ua:two"  # the session kept its upstream
    with s.udp_client() as fresh:
        assert s.udp_ask(fresh, p.udp_port, b"three") == b"ub:three"
    session.close()
    assert p.metric("proxy_reloads_total", result="ok") == 1
    assert p.metric("proxy_config_generation") == 2


def test_sighup_with_a_broken_rule_file_keeps_the_old_rules(proxy, backends):
    a = backends("a")
    good = f"backend a {a.address}\ndefault -> forward(a)\n"
    p = proxy(good, config=s.config("2s"), extra_args=s.WORKERS_2)
    p.rules_path.write_text(good.replace("forward(a)", "forward(wbe)"))
    p.signal(signal.SIGHUP)
    failed = s.wait_log(p, "the failed reload", event="reload_failed")
    assert "still serving generation 1" in failed["msg"]
    assert "main.rules:2:" in failed["msg"] and "error[E" in failed["msg"]  # the diagnostic
    assert "wbe" in failed["msg"]
    for _ in range(10):
        assert s.greeting(p.tcp_port) == b"backend=a\n"
    assert p.metric("proxy_reloads_total", result="failed") == 1
    assert p.metric("proxy_reloads_total", result="ok") == 0
    assert p.metric("proxy_config_generation") == 1
    assert p.http("/healthz")[0] == 200
    assert "serving generation 2" not in p.logs()  # no worker saw the broken rules


def test_twenty_reloads_under_load_lose_no_connection(proxy, backends):
    a, b = backends("a"), backends("b")
    rules = f"backend a {a.address}\nbackend b {b.address}\ndefault -> forward(%s)\n"
    p = proxy(rules % "a", config=s.config("2s"), extra_args=s.WORKERS_2)
    load = _Load(p.tcp_port, threads=4)
    try:
        for generation in range(2, 22):
            p.rules_path.write_text(rules % ("b" if generation % 2 else "a"))
            p.signal(signal.SIGHUP)
            s.wait_reloaded(p, generation)
    finally:
        load.stop()
    assert load.errors == []
    assert load.done > 100  # the load really ran across the reloads
    assert p.metric("proxy_reloads_total", result="ok") == 20


class _Load:
    """Threads that connect, read the greeting, echo a payload and check it, until stopped."""

    def __init__(self, port: int, threads: int):
        self.port, self.done, self.errors = port, 0, []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,)) for n in range(threads)]
        for t in self._threads:
            t.start()

    def _run(self, n: int) -> None:
        payload = s.pattern(4096, n)
        while not self._stop.is_set():
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5) as c:
                    hello = s.recv_line(c)
                    c.sendall(payload)
                    echoed = s.recv_exact(c, len(payload))
                if hello not in (b"backend=a\n", b"backend=b\n") or echoed != payload:
                    self.errors.append(f"bad answer {hello!r}")
            except OSError as exc:
                self.errors.append(repr(exc))
            self.done += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
