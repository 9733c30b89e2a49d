"""The programs the benchmark drives (found, or installed from Debian and PyPI) and the
facts about the machine that go beside every result.

Installs only what is missing, with the ordinary clients (apt-get, pip), and says so
on stdout; never changes a system service or configuration.
"""

from __future__ import annotations

import importlib
import os
import platform
import re
import shutil
import subprocess
import sys
import time

from benchlib.procs import BenchError

NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

# what must be there -> the Debian package that brings it
REQUIRED = (
    ("haproxy", "haproxy"),
    ("nginx", "nginx"),
    (NGINX_STREAM_MODULE, "libnginx-mod-stream"),
    ("wrk", "wrk"),
    ("iperf3", "iperf3"),
)


def _present(thing: str) -> bool:
    return os.path.exists(thing) if thing.startswith("/") else shutil.which(thing) is not None


def missing_packages() -> list[str]:
    return [package for thing, package in REQUIRED if not _present(thing)]


def ensure_programs(install: bool) -> None:
    """Find haproxy, nginx (with its stream module), wrk and iperf3, or install them."""
    missing = missing_packages()
    if not missing:
        return
    command = ["apt-get", "install", "-y", "-q", *missing]
    if not install:
        raise BenchError(f"missing Debian packages {missing!r}; install them with: "
                         f"{' '.join(command)} (or run without --no-install)")
    print(f"installing {' '.join(missing)} (apt-get)", flush=True)
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(sudo + command, env=env).returncode != 0:
        subprocess.run(sudo + ["apt-get", "update", "-q"], env=env, check=False)
        subprocess.run(sudo + command, env=env, check=False)
    if missing_packages():
        raise BenchError(f"could not install {missing_packages()!r} with apt-get; install "
                         "them by hand and run again")


def ensure_matplotlib(install: bool) -> bool:
    """True when matplotlib imports (installing it with pip first if allowed)."""
    try:
        importlib.import_module("matplotlib")
        return True
    except ImportError:
        if not install:
            return False
    print("installing matplotlib (pip) for the chart", flush=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                    "--disable-pip-version-check", "matplotlib"], check=False)
    importlib.invalidate_caches()
    try:
        importlib.import_module("matplotlib")
        return True
    except ImportError:
        return False


# --- facts ---------------------------------------------------------------------------


def _first_line(argv: list[str], pattern: str) -> str:
    """The first match of `pattern` in what `argv` prints (stdout and stderr)."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "not found"
    found = re.search(pattern, done.stdout + done.stderr)
    return found.group(1) if found else "unknown"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_gib() -> str:
    with open("/proc/meminfo") as info:
        kib = int(info.readline().split()[1])
    return f"{kib / 2**20:.1f} GiB"


def _module_version(name: str) -> str:
    try:
        return importlib.import_module(name).__version__
    except (ImportError, AttributeError):
        return "not installed"


def load_average() -> str:
    with open("/proc/loadavg") as avg:
        return " ".join(avg.read().split()[:3])


def machine_facts() -> dict[str, str]:
    """CPU, kernel, memory and the versions of everything measured, as label -> text."""
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "CPU": f"{_cpu_model()}, {os.cpu_count()} CPUs",
        "memory": _mem_gib(),
        "kernel": platform.release(),
        "HAProxy": _first_line(["haproxy", "-v"], r"version (\S+)"),
        "nginx": _first_line(["nginx", "-v"], r"nginx/(\S+)"),
        "wrk": _first_line(["wrk", "-v"], r"wrk (\S+)"),
        "iperf3": _first_line(["iperf3", "--version"], r"iperf (\S+)"),
        "Python": platform.python_version(),
        "gevent": _module_version("gevent"),
        "dynproxy": _module_version("dynproxy"),
        "load average at start": load_average(),
    }
