"""Master and workers, with real processes: both workers serve, a dead worker is
replaced, workers serve what the master validated, a taken port is explained."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import proc_support as s

ROOT = Path(__file__).resolve().parents[2]


def _rules(*backends) -> str:
    lines = [f"backend {b.name} {b.address}" for b in backends]
    return "\n".join(lines + [f"default -> forward({backends[0].name})", ""])


def test_both_workers_serve_and_metrics_add_up(proxy, backends):
    a = backends("a")
    p = proxy(_rules(a), config=s.config(), extra_args=s.WORKERS_2)
    assert sorted(s.worker_pids(p)) == [0, 1]
    for _ in range(40):  # SO_REUSEPORT spreads by 4-tuple: 40 all on one side is 2**-39
        assert s.greeting(p.tcp_port) == b"backend=a\n"
    lines = p.wait_access_lines(40)
    assert {line["worker"] for line in lines} == {0, 1}
    # /metrics is the master's aggregate of both workers' counters.
    s.wait_for(p, lambda: p.metric("proxy_connections_total", proto="tcp") == 40,
               "40 connections counted over both workers")
    assert p.metric("proxy_lifecycle_state", state="serving") == 1
    assert p.http("/healthz") == (200, b"ok\n")
    assert "a" in json.loads(p.http("/backends")[1])["backends"]


def test_a_killed_worker_is_replaced(proxy, backends):
    a = backends("a")
    p = proxy(_rules(a), config=s.config(), extra_args=s.WORKERS_2)
    old = s.worker_pids(p)
    os.kill(old[0], signal.SIGKILL)
    new = s.wait_for(p, lambda: (pids := s.worker_pids(p)) and pids[0] != old[0] and pids,
                     "a replacement for worker 0")
    assert new[1] == old[1]
    s.wait_ready(p, 0, new[0])
    s.wait_log(p, "worker 0's death logged", msg="worker 0 (pid %d) died" % old[0])
    s.wait_for(p, lambda: p.metric("proxy_worker_restarts_total") == 1, "restart counted")
    before = len(p.access_lines())
    for _ in range(40):
        assert s.greeting(p.tcp_port) == b"backend=a\n"
    lines = p.wait_access_lines(before + 40)[before:]
    assert {line["worker"] for line in lines} == {0, 1}  # the new worker 0 serves too


def test_workers_serve_what_the_master_validated_not_the_file(proxy, backends):
    a = backends("a")
    p = proxy(_rules(a), config=s.config(), extra_args=s.WORKERS_2)
    p.rules_path.write_text("this is -> not( a rule file\n")  # edited, never reloaded
    old = s.worker_pids(p)
    os.kill(old[1], signal.SIGKILL)
    new = s.wait_for(p, lambda: (pids := s.worker_pids(p)) and pids[1] != old[1] and pids,
                     "a replacement for worker 1")
    s.wait_ready(p, 1, new[1])
    for _ in range(20):
        assert s.greeting(p.tcp_port) == b"backend=a\n"
    assert "cannot start" not in p.logs()


def test_a_taken_port_names_its_holder(tmp_path):
    (tmp_path / "main.rules").write_text("backend a 127.0.0.1:9\ndefault -> forward(a)\n")
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        run = subprocess.run(
            [sys.executable, "-m", "dynproxy", "--rules", str(tmp_path / "main.rules"),
             "--tcp-bind", f"127.0.0.1:{port}", "--udp-bind",
             f"127.0.0.1:{s.free_port(socket.SOCK_DGRAM)}", "--metrics-bind", f"127.0.0.1:{s.free_port()}", "--workers", "2"],
            cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1, run.stderr
    assert f"cannot listen on tcp 127.0.0.1:{port}: the port is already in use" in run.stderr
    assert f"held by pid {os.getpid()}" in run.stderr
    assert "--tcp-bind" in run.stderr
    assert "started: pid" not in run.stderr  # refused before any worker started


def test_a_second_instance_on_the_same_pid_file_is_refused(proxy, backends, tmp_path):
    a = backends("a")
    pid_file = tmp_path / "dynproxy.pid"
    p = proxy(_rules(a), config=s.config(), extra_args=(*s.WORKERS_2, "--pid-file",
                                                        str(pid_file)))
    assert pid_file.read_text().strip() == str(p.proc.pid)
    run = subprocess.run(
        [sys.executable, "-m", "dynproxy", "--rules", str(p.rules_path),
         "--tcp-bind", f"127.0.0.1:{s.free_port()}", "--udp-bind",
         f"127.0.0.1:{s.free_port(socket.SOCK_DGRAM)}",
         "--metrics-bind", f"127.0.0.1:{s.free_port()}", "--pid-file", str(pid_file)],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert run.returncode == 1
    assert f"already running as pid {p.proc.pid}" in run.stderr
    assert pid_file.read_text().strip() == str(p.proc.pid)


def test_health_checks_run_once_in_the_master_and_reach_every_worker(proxy, backends):
    a = backends("a")
    dead = s.free_port()  # nothing listens: connections are refused
    p = proxy(f"""
pool web {{
    member {a.address} weight 1
    member 127.0.0.1:{dead} weight 100
    health tcp every 100ms timeout 50ms rise 1 fall 1
}}
default -> forward(web)
""", config=s.config(), extra_args=s.WORKERS_2)
    s.wait_for(p, lambda: "is down" in p.logs(), "the dead member marked down")
    before = p.metric("proxy_errors_total", reason="connect_failed")
    for _ in range(30):  # weight 100 would pick the dead member, were it not known down
        assert s.greeting(p.tcp_port) == b"backend=a\n"
    assert p.metric("proxy_errors_total", reason="connect_failed") == before
    [down] = [r for r in s.records(p) if "is down" in r.get("msg", "")]
    assert "worker" not in down  # the check ran in the master, once, not per worker
    assert {line["worker"] for line in p.wait_access_lines(30)} == {0, 1}
