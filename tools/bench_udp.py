#!/usr/bin/env python3
"""UDP round trips per second through dynproxy's UdpProxy, against direct echo (and
nginx stream when it is installed), in one run.

    python tools/bench_udp.py [--seconds 3] [--repeat 3] [--ports 100] [--pin] [--no-nginx]

A closed loop: each of `--ports` client sockets keeps one 64-byte datagram in flight,
sending the next as soon as the answer arrives. A datagram unanswered for LOSS_AFTER
seconds counts as lost and is sent again. The echo backend, the proxy and nginx run as
subprocesses of this script (roles `echo` and `proxy`), each stopped by its PID.
`--pin` puts the proxy on CPU 0 and the client and echo on the other CPUs, so the
proxy under test gets one core as nginx's single worker does.
Targets are measured in turn, round after round. Prints one line per measurement and
a summary with medians, min-max, ratios, and the CPU each proxy spent per round trip
(which, unlike round trips/s, does not depend on the load generator keeping up).
"""

from __future__ import annotations

import argparse
import os
import select
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PAYLOAD = b"x" * 64
LOSS_AFTER = 0.5
NGINX_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

# With a C compiler, the client and the echo are C (recvmmsg/sendmmsg): a Python load
# generator saturates its core before a proxy does, and would measure itself.
LOAD_C = r"""
/* closed-loop UDP client: N connected sockets, one 64-byte datagram in flight each */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec / 1e9; }
int main(int argc, char **argv) {
    int port = atoi(argv[1]), n = atoi(argv[2]); double seconds = atof(argv[3]), loss_after = 0.5;
    char payload[64], buf[2048]; memset(payload, 'x', sizeof payload);
    struct sockaddr_in to = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &to.sin_addr);
    int ep = epoll_create1(0), *fds = calloc(n, sizeof *fds); double *sent = calloc(n, sizeof *sent);
    long done = 0, lost = 0;
    for (int i = 0; i < n; i++) {
        fds[i] = socket(AF_INET, SOCK_DGRAM | SOCK_NONBLOCK, 0);
        if (connect(fds[i], (void *)&to, sizeof to)) { perror("connect"); return 2; }
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
        epoll_ctl(ep, EPOLL_CTL_ADD, fds[i], &ev);
        send(fds[i], payload, sizeof payload, 0); sent[i] = now();
    }
    double start = now(), end = start + seconds, scan = start + loss_after, t;
    struct epoll_event evs[256];
    while ((t = now()) < end) {
        int k = epoll_wait(ep, evs, 256, 50);
        for (int e = 0; e < k; e++) {
            int i = evs[e].data.u32, got = 0;
            while (recv(fds[i], buf, sizeof buf, 0) > 0) got++;
            if (got) { done += got; send(fds[i], payload, sizeof payload, 0); sent[i] = t; }
        }
        if (t >= scan) {
            for (int i = 0; i < n; i++)
                if (t - sent[i] > loss_after) { lost++; send(fds[i], payload, sizeof payload, 0); sent[i] = t; }
            scan = t + loss_after / 2;
        }
    }
    printf("%ld %ld %.6f\n", done, lost, now() - start);
    return 0;
}
"""

ECHO_C = r"""
/* UDP echo: batches of datagrams with recvmmsg, answered with sendmmsg */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#define VLEN 64
int main(void) {
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in me = {.sin_family = AF_INET}; socklen_t len = sizeof me;
    inet_pton(AF_INET, "127.0.0.1", &me.sin_addr);
    if (bind(fd, (void *)&me, sizeof me)) { perror("bind"); return 2; }
    getsockname(fd, (void *)&me, &len); printf("%d\n", ntohs(me.sin_port)); fflush(stdout);
    static char bufs[VLEN][2048]; struct sockaddr_in addrs[VLEN]; struct iovec iov[VLEN]; struct mmsghdr msgs[VLEN];
    for (;;) {
        memset(msgs, 0, sizeof msgs);
        for (int i = 0; i < VLEN; i++) {
            iov[i].iov_base = bufs[i]; iov[i].iov_len = sizeof bufs[i];
            msgs[i].msg_hdr.msg_iov = &iov[i]; msgs[i].msg_hdr.msg_iovlen = 1;
            msgs[i].msg_hdr.msg_name = &addrs[i]; msgs[i].msg_hdr.msg_namelen = sizeof addrs[i];
        }
        int k = recvmmsg(fd, msgs, VLEN, MSG_WAITFORONE, NULL);
        if (k <= 0) continue;
        for (int i = 0; i < k; i++) iov[i].iov_len = msgs[i].msg_len;
        sendmmsg(fd, msgs, k, 0);
    }
}
"""


# roles run in subprocesses ------------------------------------------------------------------
def run_echo() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    recvfrom, sendto = sock.recvfrom, sock.sendto
    while True:
        data, addr = recvfrom(65535)
        sendto(data, addr)


def run_proxy(echo_port: int) -> None:
    from gevent import monkey

    monkey.patch_all()  # as a worker runs
    import gevent

    from dynproxy.core.config import load_config
    from dynproxy.core.topology import Topology
    from dynproxy.lang import load_text
    from dynproxy.net.state import Serving, Snapshot
    from dynproxy.net.udp import UdpProxy
    from dynproxy.net.udp_listen import open_udp_socket
    from dynproxy.obs.log import setup_logging
    from dynproxy.obs.metrics import init_metrics

    setup_logging("info", stream=open(os.devnull, "w"))  # access log on, as in production
    rules = load_text(f"backend echo 127.0.0.1:{echo_port}\ndefault -> forward(echo)\n",
                      "<bench>")
    cfg = load_config(None)
    snap = Snapshot(rules, Topology(rules.backends, rules.pools), cfg, 1, needs_peek=False)
    sock = open_udp_socket("127.0.0.1", 0, False)
    proxy = UdpProxy(sock, "bench", Serving(snap), init_metrics(), 60.0, 100000)
    proxy.start()
    print(sock.getsockname()[1], flush=True)
    while True:
        gevent.sleep(3600)


# processes ------------------------------------------------------------------------------------
def build_c_tools(tmp: str) -> dict[str, str] | None:
    """Compile the C client and echo into `tmp`; None without a compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    built = {}
    for name, source in (("load", LOAD_C), ("echo", ECHO_C)):
        Path(tmp, f"{name}.c").write_text(source)
        subprocess.run([cc, "-O2", "-o", f"{tmp}/{name}", f"{tmp}/{name}.c"], check=True)
        built[name] = f"{tmp}/{name}"
    return built


def spawn_role(command: list[str], cpus: set[int] | None) -> tuple[subprocess.Popen, int]:
    """Start a process that prints its UDP port on its first line."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, preexec_fn=_pin(cpus))
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        stop(proc)
        sys.exit(f"bench_udp: {command!r} did not start (it printed {line!r})")
    return proc, int(line)


def spawn_nginx(echo_port: int, tmp: str, cpus: set[int] | None):
    port = _free_udp_port()
    conf = Path(tmp, "nginx.conf")
    conf.write_text(
        f"load_module {NGINX_MODULE};\nworker_processes 1;\ndaemon off;\n"
        f"pid {tmp}/nginx.pid;\nerror_log {tmp}/error.log warn;\n"
        "events { worker_connections 4096; }\n"
        f"stream {{ server {{ listen 127.0.0.1:{port} udp; proxy_pass 127.0.0.1:{echo_port};"
        " proxy_timeout 60s; } }\n")
    proc = subprocess.Popen(["nginx", "-p", tmp, "-c", str(conf)], preexec_fn=_pin(cpus),
                            stderr=subprocess.DEVNULL)
    time.sleep(0.5)  # nginx has no readiness line; its workers bind quickly
    if proc.poll() is not None:
        sys.exit(f"bench_udp: nginx exited with {proc.returncode}; see {tmp}/error.log")
    return proc, port


def _pin(cpus: set[int] | None):
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def _free_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# the load -------------------------------------------------------------------------------------
def closed_loop(port: int, n_ports: int, seconds: float, c_load: str | None
                ) -> tuple[float, float]:
    """(round trips per second, fraction lost) over `seconds` of load."""
    if c_load:
        out = subprocess.run([c_load, str(port), str(n_ports), str(seconds)], check=True,
                             capture_output=True, text=True).stdout.split()
        done, lost, elapsed = int(out[0]), int(out[1]), float(out[2])
        return done / elapsed, lost / max(1, done + lost)
    socks = []
    for _ in range(n_ports):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.connect(("127.0.0.1", port))
        sock.setblocking(False)
        socks.append(sock)
    try:
        return _drive(socks, seconds)
    finally:
        for sock in socks:
            sock.close()


def _drive(socks, seconds: float) -> tuple[float, float]:
    poller = select.epoll()
    by_fd = {s.fileno(): s for s in socks}
    sent_at = dict.fromkeys(by_fd, time.monotonic())
    for fd, sock in by_fd.items():
        poller.register(fd, select.EPOLLIN)
        sock.send(PAYLOAD)
    done = lost = 0
    start = time.monotonic()
    end, next_scan = start + seconds, start + LOSS_AFTER
    while (now := time.monotonic()) < end:
        for fd, _ in poller.poll(0.05):
            done += _answer(by_fd[fd], sent_at, fd, now)
        if now >= next_scan:
            lost += _resend_lost(by_fd, sent_at, now)
            next_scan = now + LOSS_AFTER / 2
    elapsed = time.monotonic() - start
    poller.close()
    return done / elapsed, lost / max(1, done + lost)


def _answer(sock, sent_at, fd, now) -> int:
    got = 0
    try:
        while True:
            sock.recv(2048)
            got += 1
    except BlockingIOError:
        pass
    if got:
        sock.send(PAYLOAD)
        sent_at[fd] = now
    return got


def _resend_lost(by_fd, sent_at, now) -> int:
    lost = 0
    for fd, when in sent_at.items():
        if now - when > LOSS_AFTER:
            lost += 1
            by_fd[fd].send(PAYLOAD)
            sent_at[fd] = now
    return lost


# the run --------------------------------------------------------------------------------------
class Target:
    """One thing to measure: a UDP port, and the process tree whose CPU to count."""

    def __init__(self, name: str, port: int, pid: int | None = None):
        self.name, self.port, self.pid = name, port, pid
        self.rates: list[float] = []
        self.losses: list[float] = []
        self.cpu_per_rt: list[float] = []  # seconds; independent of the load generator

    def run_once(self, args, label: str) -> None:
        cpu_before, t0 = cpu_seconds(self.pid), time.monotonic()
        rate, loss = closed_loop(self.port, args.ports, args.seconds, args.c_load)
        cpu, wall = cpu_seconds(self.pid) - cpu_before, time.monotonic() - t0
        self.rates.append(rate)
        self.losses.append(loss)
        extra = ""
        if self.pid and rate:
            self.cpu_per_rt.append(cpu / (rate * wall))
            extra = f"  proxy CPU {cpu / wall:4.0%}, {self.cpu_per_rt[-1] * 1e6:5.1f} us/rt"
        print(f"{self.name:10s} {label}: {rate:10,.0f} round trips/s  loss {loss:.4%}{extra}",
              flush=True)


def measure(targets: list[Target], args) -> None:
    """Round-robin over the targets, so that load from elsewhere on the machine falls
    on all of them alike rather than on whichever ran at the wrong moment."""
    for target in targets:
        closed_loop(target.port, args.ports, 0.5, args.c_load)  # warm up: sessions exist
    for i in range(args.repeat):
        for target in targets:
            target.run_once(args, f"run {i + 1}")


def cpu_seconds(pid: int | None) -> float:
    """User + system CPU of a process and its children (nginx's workers), in seconds."""
    if pid is None:
        return 0.0
    total = 0.0
    for p in [pid, *_children(pid)]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def summary(targets: list[Target]) -> None:
    med = {t.name: statistics.median(t.rates) for t in targets}
    print(f"\n{'target':10s} {'median rt/s':>12s} {'min-max':>21s} {'max loss':>9s} "
          f"{'x direct':>9s} {'x nginx':>8s} {'CPU us/rt':>10s}")
    for t in targets:
        vs_nginx = f"{med[t.name] / med['nginx']:8.2f}" if "nginx" in med else "       -"
        cpu = f"{statistics.median(t.cpu_per_rt) * 1e6:10.1f}" if t.cpu_per_rt else "         -"
        print(f"{t.name:10s} {med[t.name]:12,.0f} {min(t.rates):10,.0f}-{max(t.rates):<10,.0f} "
              f"{max(t.losses):9.4%} {med[t.name] / med['direct']:9.2f} {vs_nginx} {cpu}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ports", type=int, default=100)
    parser.add_argument("--pin", action="store_true")
    parser.add_argument("--no-nginx", action="store_true")
    parser.add_argument("--python-load", action="store_true",
                        help="use the Python client and echo even when a C compiler exists")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tools = None if args.python_load else build_c_tools(tmp)
        args.c_load = tools["load"] if tools else None
        echo_cmd = [tools["echo"]] if tools else [sys.executable, __file__, "echo"]
        print(f"load generator and echo: {'C' if tools else 'Python'}; "
              f"{args.ports} ports, 64-byte datagrams, {args.seconds:g} s x {args.repeat}")
        run_all(args, echo_cmd, tmp)


def run_all(args, echo_cmd: list[str], tmp: str) -> None:
    ncpu = os.cpu_count() or 1
    proxy_cpus = {0} if args.pin and ncpu > 1 else None
    other_cpus = set(range(1, ncpu)) if proxy_cpus else None
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    procs = []
    try:
        echo, echo_port = spawn_role(echo_cmd, other_cpus)
        procs.append(echo)
        targets = [Target("direct", echo_port)]
        proxy, proxy_port = spawn_role([sys.executable, __file__, "proxy", str(echo_port)],
                                       proxy_cpus)
        procs.append(proxy)
        targets.append(Target("dynproxy", proxy_port, proxy.pid))
        if not args.no_nginx and shutil.which("nginx") and os.path.exists(NGINX_MODULE):
            nginx, nginx_port = spawn_nginx(echo_port, tmp, proxy_cpus)
            procs.append(nginx)
            targets.append(Target("nginx", nginx_port, nginx.pid))
        measure(targets, args)
        summary(targets)
    finally:
        for proc in procs:
            stop(proc)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "echo":
        run_echo()
    elif len(sys.argv) > 2 and sys.argv[1] == "proxy":
        run_proxy(int(sys.argv[2]))
    else:
        main()
