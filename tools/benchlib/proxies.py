"""The things measured: direct (no proxy), HAProxy (mode tcp, with or without its
splice options, or terminating TLS), nginx stream, and dynproxy, each started with N
workers/threads on free 127.0.0.1 ports in front of a given backend.

A `Target` knows its ports and its process tree, so a workload can read the CPU time
and memory the proxy (and only it) used. dynproxy runs with its production defaults:
SNI peek on (the rule file has an `sni` rule), metrics on, access log on (to a file).
"""

from __future__ import annotations

import itertools
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from benchlib.machine import NGINX_STREAM_MODULE
from benchlib.procs import (
    Proc,
    cpu_seconds,
    free_port,
    listening,
    rss_kb,
    spawn,
    wait_listening,
)

ROOT = Path(__file__).resolve().parents[2]
SNI = "bench.example.com"
_serial = itertools.count(1)


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a target forwards: a TCP backend port, and optionally a UDP one."""

    tcp: int
    udp: int | None = None


@dataclass(eq=False)
class Target:
    """One running thing under test; `proc` is None for direct."""

    name: str
    workers: int | None
    tcp_port: int
    udp_port: int | None = None
    proc: Proc | None = None
    note: str = ""

    def pids(self) -> list[int]:
        return self.proc.tree() if self.proc else []

    def cpu(self) -> float:
        return cpu_seconds(self.pids())

    def rss_kb(self) -> int:
        return rss_kb(self.pids())

    def check_alive(self) -> None:
        if self.proc and not self.proc.alive():
            raise RuntimeError(f"{self.name} died (status {self.proc.popen.returncode}):\n"
                               f"{self.proc.log_tail()}")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


def direct(upstream: Upstream) -> Target:
    return Target("direct", None, upstream.tcp, upstream.udp)


def _home(work: Path, name: str) -> Path:
    home = work / f"{name}-{next(_serial)}"
    home.mkdir()
    return home


# --- HAProxy -------------------------------------------------------------------------


def haproxy_config(workers: int, port: int, backend: int, maxconn: int, *,
                   splice: bool = False, pem: Path | None = None,
                   ciphers: str | None = None) -> str:
    lines = ["global", f"  nbthread {workers}", f"  maxconn {maxconn}"]
    if pem is not None:
        lines += ["  ssl-default-bind-options ssl-min-ver TLSv1.2"]
        lines += [f"  ssl-default-bind-ciphers {ciphers}"] if ciphers else []
    lines += ["defaults", "  mode tcp", "  timeout connect 5s", "  timeout client 300s",
              "  timeout server 300s"]
    if splice:
        lines += ["  option splice-request", "  option splice-response"]
    tls = f" ssl crt {pem}" if pem is not None else ""
    lines += ["frontend bench_in", f"  bind 127.0.0.1:{port}{tls}", "  default_backend app",
              "backend app", f"  server app 127.0.0.1:{backend}", ""]
    return "\n".join(lines)


def start_haproxy(work: Path, workers: int, upstream: Upstream, nofile: int, *,
                  splice: bool = False, pem: Path | None = None,
                  ciphers: str | None = None) -> Target:
    name = "haproxy-splice" if splice else "haproxy"
    home, port = _home(work, name), free_port()
    # HAProxy sizes its fd needs from maxconn (2 per connection, plus splice pipes)
    maxconn = max(1000, int((nofile - 500) / 2.6))
    conf = home / "haproxy.cfg"
    conf.write_text(haproxy_config(workers, port, upstream.tcp, maxconn, splice=splice,
                                   pem=pem, ciphers=ciphers))
    proc = spawn(name, ["haproxy", "-db", "-f", str(conf)], log=home / "haproxy.log")
    wait_listening(port, proc)
    return Target(name, workers, port, None, proc, f"nbthread {workers}, maxconn {maxconn}")


# --- nginx stream --------------------------------------------------------------------


def nginx_stream_config(workers: int, home: Path, nofile: int, port: int, upstream: Upstream,
                        udp_port: int | None) -> str:
    servers = [f"    server {{ listen 127.0.0.1:{port} backlog=4096; "
               f"proxy_pass 127.0.0.1:{upstream.tcp}; }}"]
    if udp_port is not None:
        servers.append(f"    server {{ listen 127.0.0.1:{udp_port} udp reuseport; "
                       f"proxy_pass 127.0.0.1:{upstream.udp}; proxy_timeout 60s; }}")
    return "\n".join([
        f"load_module {NGINX_STREAM_MODULE};",
        f"worker_processes {workers};", "daemon off;", f"pid {home}/nginx.pid;",
        f"error_log {home}/error.log warn;", f"worker_rlimit_nofile {nofile};",
        f"events {{ worker_connections {max(1024, nofile - 100)}; }}",
        "stream {", *servers, "}", ""])


def start_nginx(work: Path, workers: int, upstream: Upstream, nofile: int) -> Target:
    home, port = _home(work, "nginx"), free_port()
    udp_port = free_port(socket.SOCK_DGRAM) if upstream.udp else None
    conf = home / "nginx.conf"
    conf.write_text(nginx_stream_config(workers, home, nofile, port, upstream, udp_port))
    proc = spawn("nginx", ["nginx", "-p", str(home), "-c", str(conf), "-e",
                           str(home / "error.log")], log=home / "stderr.log")
    wait_listening(port, proc)
    return Target("nginx", workers, port, udp_port, proc, f"worker_processes {workers}")


# --- dynproxy ------------------------------------------------------------------------


def passthrough_rules(upstream: Upstream) -> str:
    """One backend, an `sni` rule so the SNI peek is on (as in production), a default."""
    lines = [f"backend app 127.0.0.1:{upstream.tcp}"]
    if upstream.udp:
        lines += [f"backend echo 127.0.0.1:{upstream.udp}", "proto udp -> forward(echo)"]
    lines += [f'sni exact "{SNI}" -> forward(app)', "default -> forward(app)"]
    return "\n".join(lines) + "\n"


def terminating_rules(upstream: Upstream) -> str:
    return (f"backend app 127.0.0.1:{upstream.tcp}\n"
            f'sni exact "{SNI}" -> terminate tls then forward(app)\n'
            "default -> terminate tls then forward(app)\n")


def dynproxy_config(workers: int, port: int, udp_port: int | None,
                    tls: tuple[Path, Path] | None) -> str:
    udp = f'["127.0.0.1:{udp_port}"]' if udp_port else "[]"
    lines = ["server:", f'  tcp_bind: ["127.0.0.1:{port}"]', f"  udp_bind: {udp}",
             f"  workers: {workers}", "monitoring:",
             f'  metrics_bind: "127.0.0.1:{free_port()}"']
    if tls:
        lines += ["tls:", f'  cert_path: "{tls[0]}"', f'  key_path: "{tls[1]}"']
    return "\n".join(lines) + "\n"


def start_dynproxy(work: Path, workers: int, upstream: Upstream, *, rules: str | None = None,
                   tls: tuple[Path, Path] | None = None, label: str = "dynproxy",
                   ready_timeout: float = 60.0) -> Target:
    """Start `python -m dynproxy --workers N`; stopped with SIGQUIT (fast stop)."""
    home, port = _home(work, label), free_port()
    udp_port = free_port(socket.SOCK_DGRAM) if upstream.udp else None
    (home / "bench.rules").write_text(rules or passthrough_rules(upstream))
    (home / "dynproxy.yaml").write_text(dynproxy_config(workers, port, udp_port, tls))
    argv = [sys.executable, "-m", "dynproxy", "--rules", str(home / "bench.rules"),
            "--config", str(home / "dynproxy.yaml"), "--workers", str(workers)]
    # stdout and stderr (JSON logs and the access log) go to a file, not a terminal
    proc = spawn(label, argv, log=home / "dynproxy.log", stop_signal=signal.SIGQUIT,
                 cwd=ROOT)
    wait_listening(port, proc, timeout=ready_timeout)
    return Target(label, workers, port, udp_port, proc, _process_note(proc, workers, port))


def _process_note(proc: Proc, workers: int, port: int, settle: float = 5.0) -> str:
    """How many processes and listeners dynproxy really runs (the --workers mode may
    be missing or partial)."""
    deadline = time.monotonic() + settle
    while time.monotonic() < deadline and (len(proc.tree()) < workers + 1
                                           or listening(port) < workers):
        time.sleep(0.1)
    count, listeners = len(proc.tree()), listening(port)
    shape = ("1 process (no separate workers)" if count == 1
             else f"{count} processes (master + {count - 1} worker(s))")
    return f"{shape}, {listeners} TCP listening socket(s)"
