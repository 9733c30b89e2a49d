"""A taken address at start-up, with a real `python -m dynproxy` and a real socket
holding the port: the master refuses to start (exit 1, before any worker) and says
which address, that another process holds it, how to find that process (`ss`), and
how to choose another address or, for /metrics, to turn the endpoint off."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ELSEWHERE = ("choose another address (--metrics-bind HOST:PORT, or monitoring.metrics_bind "
             "in the config), or turn the endpoint off (monitoring.enable_metrics: false)")


@pytest.fixture
def free_port(testkit):
    return testkit.free_port


@pytest.fixture
def rules(tmp_path) -> Path:
    path = tmp_path / "main.rules"
    path.write_text("backend a 127.0.0.1:9\ndefault -> forward(a)\n")
    return path


@pytest.fixture
def held():
    """A socket of this test process holding a port: held(kind, host) -> port."""
    sockets = []

    def hold(kind=socket.SOCK_STREAM, host="127.0.0.1") -> int:
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, kind)
        sock.bind((host, 0))
        if kind == socket.SOCK_STREAM:
            sock.listen(1)
        sockets.append(sock)
        return sock.getsockname()[1]

    yield hold
    for sock in sockets:
        sock.close()


def start(rules: Path, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "dynproxy", "--rules", str(rules),
                           "--workers", "1", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert "started: pid" not in done.stderr  # refused before any worker started
    return done


def refusal(done: subprocess.CompletedProcess) -> str:
    return done.stderr.strip().splitlines()[-1]


def test_metrics_port_in_use_says_which_who_how_to_find_and_what_to_do(rules, held, free_port):
    port = held()
    done = start(rules, "--metrics-bind", f"127.0.0.1:{port}",
                 "--tcp-bind", f"127.0.0.1:{free_port()}", "--udp-bind", "none")
    line = refusal(done)
    assert line.startswith(  # the holder is this test process
        f"dynproxy: not starting: cannot serve /metrics, /healthz and /backends on "
        f"127.0.0.1:{port}: the address is already in use by pid {os.getpid()} (")
    assert line.endswith(
        f") (`ss -ltnp 'sport = :{port}'` shows which); stop that process, {ELSEWHERE}")


def test_metrics_port_from_the_config_in_use_on_ipv6(rules, held, free_port, tmp_path):
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        port = held(host="::1")
    except OSError:
        pytest.skip("no ::1 here")
    config = tmp_path / "dynproxy.yaml"
    config.write_text(f'monitoring:\n  metrics_bind: "[::1]:{port}"\n')
    done = start(rules, "--config", str(config), "--tcp-bind", f"127.0.0.1:{free_port()}",
                 "--udp-bind", "none")
    assert refusal(done).startswith(
        f"dynproxy: not starting: cannot serve /metrics, /healthz and /backends on "
        f"[::1]:{port}: the address is already in use by pid {os.getpid()} (")


def test_the_advice_works_metrics_off_starts_with_the_port_still_taken(rules, held, free_port,
                                                                      tmp_path):
    port = held()
    config = tmp_path / "dynproxy.yaml"
    config.write_text(f'monitoring:\n  metrics_bind: "127.0.0.1:{port}"\n'
                      "  enable_metrics: false\nshutdown:\n  drain_timeout: 0s\n")
    log = tmp_path / "proxy.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "dynproxy", "--rules", str(rules),
                                 "--config", str(config), "--workers", "1", "--tcp-bind",
                                 f"127.0.0.1:{free_port()}", "--udp-bind", "none"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 20
            while "metrics off" not in log.read_text() and proc.poll() is None \
                    and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "with 1 worker(s): tcp ['127.0.0.1:" in log.read_text(), log.read_text()
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0


@pytest.mark.parametrize("proto", ["tcp", "udp"])
def test_listen_port_in_use_names_the_holder_and_how_to_find_it(rules, held, free_port, proto):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    port = held(kind)
    binds = {"tcp": f"127.0.0.1:{free_port()}", "udp": "none", proto: f"127.0.0.1:{port}"}
    done = start(rules, "--metrics-bind", f"127.0.0.1:{free_port()}",
                 "--tcp-bind", binds["tcp"], "--udp-bind", binds["udp"])
    line = refusal(done)
    ss = "ss -ltnp" if proto == "tcp" else "ss -lunp"
    assert line.startswith(f"dynproxy: not starting: cannot listen on {proto} 127.0.0.1:{port}: "
                           f"the port is already in use (held by pid {os.getpid()}: ")
    assert line.endswith(f"); `{ss} 'sport = :{port}'` shows the process (as root: any "
                         f"user's); stop that process or choose another address "
                         f"(server.{proto}_bind, --{proto}-bind)")
