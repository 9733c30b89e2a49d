"""Reload and stop from the outside: `dynproxy reload|stop` through the pid file,
systemd's notify protocol, and reloads that need new sockets or other worker counts."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import proc_support as s

ROOT = Path(__file__).resolve().parents[2]


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dynproxy", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)


def test_reload_and_stop_commands_find_the_master_by_its_pid_file(proxy, backends, tmp_path):
    a = backends("a")
    pid_file = tmp_path / "run" / "dynproxy.pid"
    pid_file.parent.mkdir()
    p = proxy(f"backend a {a.address}\ndefault -> forward(a)\n",
              config=s.config("2s", f"server:\n  pid_file: {pid_file}\n"),
              extra_args=s.WORKERS_2)
    done = _cli("reload", "--config", str(tmp_path / "dynproxy.yaml"))
    assert done.returncode == 0, done.stderr
    assert f"sent SIGHUP to pid {p.proc.pid}" in done.stdout
    s.wait_reloaded(p, 2)
    argv = Path(f"/proc/{s.worker_pids(p)[0]}/cmdline").read_bytes().split(b"\0")
    metrics_dir = Path(argv[argv.index(b"--metrics-dir") + 1].decode())
    assert metrics_dir.is_dir()
    done = _cli("stop", "--pid-file", str(pid_file))
    assert done.returncode == 0, done.stderr
    assert "dynproxy: stopped" in done.stdout
    assert p.proc.wait(5) == 0
    assert not pid_file.exists()  # removed by the master at exit
    assert not metrics_dir.exists()  # and so is the metrics directory
    stale = _cli("stop", "--pid-file", str(pid_file))
    assert stale.returncode == 1
    assert f"no pid file at {str(pid_file)!r}" in stale.stderr


def test_the_commands_refuse_a_pid_that_is_not_dynproxy(tmp_path):
    pid_file = tmp_path / "other.pid"
    pid_file.write_text(f"{os.getppid()}\n")  # alive, but pytest's parent, not dynproxy
    done = _cli("reload", "--pid-file", str(pid_file))
    assert done.returncode == 1
    assert "not dynproxy; refusing to signal it" in done.stderr


def test_systemd_hears_ready_reloading_and_stopping(proxy, backends, tmp_path, monkeypatch):
    a = backends("a")
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as systemd:
        systemd.bind(path)
        systemd.settimeout(10)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        p = proxy(f"backend a {a.address}\ndefault -> forward(a)\n", config=s.config("2s"),
                  extra_args=s.WORKERS_2)
        assert systemd.recv(4096).split(b"\n")[0] == b"READY=1"
        p.signal(signal.SIGHUP)
        reloading = systemd.recv(4096).split(b"\n")
        assert reloading[0] == b"RELOADING=1"
        assert reloading[1].startswith(b"MONOTONIC_USEC=") and reloading[1][15:].isdigit()
        assert systemd.recv(4096).split(b"\n")[0] == b"READY=1"
        p.signal(signal.SIGTERM)
        assert systemd.recv(4096).split(b"\n")[0] == b"STOPPING=1"
        assert p.proc.wait(10) == 0
        systemd.settimeout(0.2)
        try:
            extra = systemd.recv(4096)
        except TimeoutError:
            extra = None
        assert extra is None  # workers never talk to systemd


class _ConfiguredProxy:
    """A proxy whose listeners come from its config file only (no --tcp-bind), so a
    reload can move them."""

    def __init__(self, tmp_path: Path, rules: str, server: dict, metrics_port: int):
        self.tmp_path = tmp_path
        self.rules = tmp_path / "main.rules"
        self.rules.write_text(rules)
        self.config = tmp_path / "dynproxy.yaml"
        self.metrics_port = metrics_port
        self.write_config(server)
        self.log = open(tmp_path / "proxy.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "dynproxy", "--rules", str(self.rules), "--config",
             str(self.config)], cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        s.wait_for(self, lambda: '"serving ' in self.logs(), "the proxy serving")

    def write_config(self, server: dict) -> None:
        lines = ["server:"] + [f"  {k}: {v}" for k, v in server.items()]
        lines += ["shutdown:", "  drain_timeout: 2s", "monitoring:",
                  f"  metrics_bind: 127.0.0.1:{self.metrics_port}", ""]
        self.config.write_text("\n".join(lines))

    def logs(self) -> str:
        self.log.flush()
        return (self.tmp_path / "proxy.log").read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)
            self.proc.wait(10)
        self.log.close()
        return self.proc.returncode


def test_a_reload_moves_a_listener_without_touching_its_connections(backends, tmp_path):
    a = backends("a")
    old_port, new_port, metrics_port = s.free_ports(3)
    udp = f"[127.0.0.1:{s.free_port(socket.SOCK_DGRAM)}]"
    p = _ConfiguredProxy(tmp_path, f"backend a {a.address}\ndefault -> forward(a)\n",
                         {"workers": 2, "tcp_bind": f"[127.0.0.1:{old_port}]", "udp_bind": udp},
                         metrics_port)
    try:
        inflight = socket.create_connection(("127.0.0.1", old_port), timeout=10)
        assert s.recv_line(inflight) == b"backend=a\n"
        p.write_config({"workers": 2, "tcp_bind": f"[127.0.0.1:{new_port}]", "udp_bind": udp})
        p.proc.send_signal(signal.SIGHUP)
        s.wait_reloaded(p, 2)
        assert s.greeting(new_port) == b"backend=a\n"
        try:
            socket.create_connection(("127.0.0.1", old_port), timeout=5).close()
            refused = False
        except ConnectionRefusedError:
            refused = True
        assert refused, "the old address still accepts"
        payload = s.pattern(100_000, 3)
        inflight.sendall(payload)
        assert s.recv_exact(inflight, len(payload)) == payload
        inflight.close()
    finally:
        assert p.stop() == 0


def test_a_reload_changes_the_number_of_workers(backends, tmp_path):
    a = backends("a")
    port, metrics_port = s.free_ports(2)
    udp = f"[127.0.0.1:{s.free_port(socket.SOCK_DGRAM)}]"
    server = {"tcp_bind": f"[127.0.0.1:{port}]", "udp_bind": udp}
    p = _ConfiguredProxy(tmp_path, f"backend a {a.address}\ndefault -> forward(a)\n",
                         {**server, "workers": 1}, metrics_port)
    try:
        p.write_config({**server, "workers": 3})
        p.proc.send_signal(signal.SIGHUP)
        s.wait_reloaded(p, 2)
        pids = s.wait_for(p, lambda: len(s.worker_pids(p)) == 3 and s.worker_pids(p),
                          "three workers")
        for slot in (1, 2):
            s.wait_ready(p, slot, pids[slot])
        p.write_config({**server, "workers": 1})
        p.proc.send_signal(signal.SIGHUP)
        s.wait_reloaded(p, 3)
        for slot in (1, 2):
            s.wait_log(p, f"worker {slot} retired", msg=f"worker {slot} (pid {pids[slot]}) exited")
        assert s.greeting(port) == b"backend=a\n"
        assert "restarting it" not in p.logs()
    finally:
        assert p.stop() == 0
