"""Small C programs the benchmark compiles with `cc`: a TCP backend that must never be
the bottleneck (a Python one would saturate its core first and measure itself).

    tcpback reply   answer the first bytes of each connection with a tiny HTTP
                    response (Connection: close), shut down writing, close on EOF
    tcpback hold    echo whatever arrives and keep the connection open until EOF
    tcpback greet   send "B" on accept (bench_tls's backend protocol), close on EOF

It listens on 127.0.0.1, on a port of its own choosing printed as its first line, and
runs until signalled. The UDP client and echo are tools/bench_udp.py's, not copied here.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from benchlib.procs import BenchError

TCPBACK_C = r"""
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>
static const char REPLY[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok";
int main(int argc, char **argv) {
    int mode = argc > 1 ? argv[1][0] : 'r';  /* r(eply), h(old), g(reet) */
    struct rlimit lim; getrlimit(RLIMIT_NOFILE, &lim);
    char *replied = calloc(lim.rlim_cur + 1, 1), buf[65536];
    int lfd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0), one = 1;
    setsockopt(lfd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in me = {.sin_family = AF_INET}; socklen_t len = sizeof me;
    inet_pton(AF_INET, "127.0.0.1", &me.sin_addr);
    if (bind(lfd, (void *)&me, sizeof me) || listen(lfd, 4096)) { perror("bind/listen"); return 2; }
    getsockname(lfd, (void *)&me, &len); printf("%d\n", ntohs(me.sin_port)); fflush(stdout);
    int ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = lfd}, evs[256];
    epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev);
    for (;;) {
        int k = epoll_wait(ep, evs, 256, -1);
        for (int e = 0; e < k; e++) {
            int fd = evs[e].data.fd;
            if (fd == lfd) {
                int c;
                while ((c = accept4(lfd, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    replied[c] = 0;
                    if (mode == 'g') { (void)!write(c, "B", 1); }
                    struct epoll_event cev = {.events = EPOLLIN | EPOLLRDHUP, .data.fd = c};
                    epoll_ctl(ep, EPOLL_CTL_ADD, c, &cev);
                }
                continue;
            }
            ssize_t n, got = 0;
            while ((n = read(fd, buf, sizeof buf)) > 0) {
                got += n;
                if (mode == 'h') (void)!write(fd, buf, n);
            }
            if (got && mode == 'r' && !replied[fd]) {
                (void)!write(fd, REPLY, sizeof REPLY - 1); shutdown(fd, SHUT_WR); replied[fd] = 1;
            }
            if (n == 0 || (n < 0 && errno != EAGAIN)) { epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL); close(fd); }
        }
    }
}
"""


def compile_c(source: str, name: str, work: Path) -> Path:
    """Compile `source` into work/`name` with -O2; BenchError without a C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BenchError("no C compiler (cc): install gcc (apt-get install -y gcc); the "
                         "backends and load generators are C so they are never the "
                         "bottleneck")
    src, exe = work / f"{name}.c", work / name
    src.write_text(source)
    done = subprocess.run([cc, "-O2", "-o", str(exe), str(src)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise BenchError(f"compiling {src} failed:\n{done.stderr[-2000:]}")
    return exe


def build_tcpback(work: Path) -> Path:
    return compile_c(TCPBACK_C, "tcpback", work)
