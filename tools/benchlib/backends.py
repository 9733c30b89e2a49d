"""The servers behind the proxies, started once per benchmark run on free 127.0.0.1
ports: an iperf3 server, nginx serving a 100-byte body over HTTP keep-alive, the C
UDP echo of tools/bench_udp.py, and the C TCP backend of `ctools` in its three modes.

Each is started lazily, the first time a workload asks for it, and stopped by PID with
everything else. Never binds anything but 127.0.0.1.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import bench_udp

from benchlib import ctools
from benchlib.procs import (
    BenchError,
    free_port,
    read_announced_port,
    spawn,
    wait_listening,
)

BODY = "0123456789" * 10  # the 100-byte body nginx serves

NGINX_HTTP = """\
worker_processes {workers};
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
worker_rlimit_nofile {nofile};
events {{ worker_connections {conns}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "{body}"; }}
    }}
}}
"""


class Backends:
    """Starts each backend on first use; `port(kind)` gives where it listens."""

    def __init__(self, work: Path, nofile: int):
        self.work, self.nofile = work, nofile
        self._ports: dict[str, int] = {}
        self._tcpback: Path | None = None
        self._udp_tools: dict[str, str] | None = None

    def port(self, kind: str) -> int:
        """kind: iperf3, http, udp_echo, reply, hold or greet."""
        if kind not in self._ports:
            self._ports[kind] = getattr(self, f"_start_{kind}")()
        return self._ports[kind]

    @property
    def udp_load(self) -> str:
        """bench_udp's compiled closed-loop UDP client."""
        return self._compile_udp()["load"]

    def _start_iperf3(self) -> int:
        port = free_port()
        proc = spawn("iperf3 server", ["iperf3", "-s", "-B", "127.0.0.1", "-p", str(port)],
                     log=self.work / "iperf3-server.log")
        wait_listening(port, proc)
        return port

    def _start_http(self) -> int:
        port, home = free_port(), self.work / "nginx-http"
        home.mkdir(exist_ok=True)
        conf = home / "nginx.conf"
        conf.write_text(NGINX_HTTP.format(
            workers=os.cpu_count() or 1, dir=home, port=port, body=BODY,
            nofile=self.nofile, conns=max(1024, self.nofile - 100)))
        proc = spawn("nginx http backend", ["nginx", "-p", str(home), "-c", str(conf),
                                            "-e", str(home / "error.log")],
                     log=home / "stderr.log")
        wait_listening(port, proc)
        return port

    def _start_udp_echo(self) -> int:
        echo = self._compile_udp()["echo"]
        proc = spawn("udp echo", [echo], stdout=subprocess.PIPE, log=self.work / "udp-echo.log")
        return read_announced_port(proc)

    def _compile_udp(self) -> dict[str, str]:
        if self._udp_tools is None:
            built = bench_udp.build_c_tools(str(self.work))
            if built is None:
                raise BenchError("no C compiler (cc) for tools/bench_udp.py's UDP client "
                                 "and echo: apt-get install -y gcc")
            self._udp_tools = built
        return self._udp_tools

    def _tcpback_mode(self, mode: str) -> int:
        if self._tcpback is None:
            self._tcpback = ctools.build_tcpback(self.work)
        proc = spawn(f"tcp backend ({mode})", [str(self._tcpback), mode], stdout=subprocess.PIPE,
                     log=self.work / f"tcpback-{mode}.log")
        return read_announced_port(proc)

    def _start_reply(self) -> int:
        return self._tcpback_mode("reply")

    def _start_hold(self) -> int:
        return self._tcpback_mode("hold")

    def _start_greet(self) -> int:
        return self._tcpback_mode("greet")
