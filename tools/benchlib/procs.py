"""Processes the benchmark starts, and what it reads about them from /proc.

Every child goes through `spawn`, which records it in a new session (so Ctrl-C on the
terminal reaches only the benchmark, which then stops its children in order);
`stop_all` runs at exit, on SIGTERM/SIGHUP and after Ctrl-C, and stops each child by
PID: the program's own stop signal to its main process, then SIGKILL to whatever is
left of the process tree it had. Processes are never looked up or killed by name, and
a PID is signalled only while its start time still matches (no reused PIDs).
"""

from __future__ import annotations

import atexit
import os
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(Exception):
    """A target could not be started or measured; the message says which and why."""


@dataclass(eq=False)
class Proc:
    """One started program: its Popen, how to stop it, and where its output went."""

    name: str
    popen: subprocess.Popen
    stop_signal: int
    log: Path | None
    known: dict[int, int] = field(default_factory=dict)  # pid -> start time, ever seen

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tree(self) -> list[int]:
        """The main process and its descendants now (remembered for the final kill)."""
        pids = [self.pid, *descendants(self.pid)]
        for pid in pids:
            started = start_time(pid)
            if started is not None:
                self.known.setdefault(pid, started)
        return pids

    def log_tail(self, chars: int = 1500) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]

    def stop(self, grace: float = 5.0) -> None:
        if self in _started:
            _started.remove(self)
        self.tree()
        if self.alive():
            _signal(self.pid, self.known.get(self.pid), self.stop_signal)
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        for pid, started in self.known.items():
            _signal(pid, started, signal.SIGKILL)
        if self.alive():
            self.popen.wait(5)


_started: list[Proc] = []


def spawn(name: str, argv: list[str], *, log: Path | None = None,
          stop_signal: int = signal.SIGTERM, stdout: int | None = None,
          cwd: Path | None = None, env: dict | None = None) -> Proc:
    """Start `argv` in its own session, output to `log` (or nowhere), and record it."""
    out = open(log, "ab") if log else subprocess.DEVNULL
    try:
        popen = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stderr=out,
                                 stdout=out if stdout is None else stdout,
                                 start_new_session=True, cwd=cwd, env=env)
    except OSError as exc:
        raise BenchError(f"cannot start {name} ({argv[0]!r}): {exc}") from exc
    finally:
        if log:
            out.close()
    proc = Proc(name, popen, stop_signal, log)
    _started.append(proc)
    proc.tree()
    return proc


def stop_all() -> None:
    """Stop every process still recorded, newest first (proxies before backends)."""
    for proc in reversed(list(_started)):
        proc.stop()


def install_stop_handlers() -> None:
    """Stop children at exit; Ctrl-C (SIGINT, even where a shell started us with it
    ignored), SIGTERM and SIGHUP all end the run through the normal unwinding."""
    atexit.register(stop_all)

    def leave(signum, _frame):
        print(f"\n{signal.Signals(signum).name}: stopping everything started",
              file=sys.stderr, flush=True)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGINT, signal.default_int_handler)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, leave)


def _signal(pid: int, started: int | None, sig: int) -> None:
    if started is None or start_time(pid) != started:
        return  # gone, or the PID now names another process
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


# --- /proc ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command name (index 0 is the state)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_time(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, through all its threads' children lists."""
    out, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in _listdir(f"/proc/{parent}/task"):
            try:
                kids = Path(f"/proc/{parent}/task/{task}/children").read_text().split()
            except OSError:
                continue
            for kid in map(int, kids):
                out.append(kid)
                todo.append(kid)
    return out


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (all their threads), in seconds."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields:
            total += int(fields[11]) + int(fields[12])
    return total / TICKS


def rss_kb(pids: list[int]) -> int:
    """Resident set size (VmRSS of /proc/PID/status) of these processes, in KiB."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
                break
    return total


# --- ports and limits ----------------------------------------------------------------


_handed_out: set[int] = set()


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free now on 127.0.0.1, never one this run handed out before (a config
    asks for several before the program binds any)."""
    while True:
        with socket.socket(socket.AF_INET, kind) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in _handed_out:
            _handed_out.add(port)
            return port


def raise_nofile() -> int:
    """Raise the soft open-files limit to the hard one (children inherit it)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def listening(port: int, udp: bool = False) -> int:
    """How many sockets listen on (TCP) or are bound to (UDP) `port`; SO_REUSEPORT
    workers count once each. Asks `ss` (the kernel filters, fast even with 100,000
    TIME_WAIT entries), else reads /proc/net/{tcp,udp}."""
    if shutil.which("ss"):
        out = subprocess.run(["ss", "-Hln" + ("u" if udp else "t"), f"sport = :{port}"],
                             capture_output=True, text=True).stdout
        return len(out.splitlines())
    want_state, suffix, count = ("07" if udp else "0A"), f":{port:04X}", 0
    with open(f"/proc/net/{'udp' if udp else 'tcp'}") as table:
        next(table)
        for line in table:
            fields = line.split(None, 4)
            if fields[3] == want_state and fields[1].endswith(suffix):
                count += 1
    return count


def wait_listening(port: int, proc: Proc, udp: bool = False, timeout: float = 20.0) -> None:
    """Return once something listens on `port`, without connecting to it (a probe
    connection would disturb iperf3); raise BenchError if `proc` dies first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"{proc.name} exited with status {proc.popen.returncode}:\n"
                             f"{proc.log_tail()}")
        if listening(port, udp):
            return
        time.sleep(0.05)
    raise BenchError(f"{proc.name} is not listening on port {port} after {timeout:g} s:\n"
                     f"{proc.log_tail()}")


def read_announced_port(proc: Proc, timeout: float = 10.0) -> int:
    """The port a child prints as its first line on stdout (a PIPE)."""
    ready, _, _ = select.select([proc.popen.stdout], [], [], timeout)
    line = proc.popen.stdout.readline().decode(errors="replace") if ready else ""
    if not line.strip().isdigit():
        raise BenchError(f"{proc.name} did not announce its port (it printed {line!r}):\n"
                         f"{proc.log_tail()}")
    return int(line)
