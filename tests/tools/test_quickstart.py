"""The quick start, as a newcomer runs it: `bash tools/quickstart.sh --once` starts the
demo backends and dynproxy on rules/main.rules, sends TCP, TLS and UDP through it, and
exits 0 only when every demo connection reached the backend the rules name.

The proxy's own addresses come from QS_* variables (free ports). The demo backends'
ports are fixed by rules/main.rules (9001-9003 TCP, 9053 UDP): when one is taken this
test fails and says which, rather than skipping.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_PORTS = ((9001, "tcp"), (9002, "tcp"), (9003, "tcp"), (9053, "udp"))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_free(port: int, proto: str) -> bool:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_quickstart_once_routes_every_demo_connection():
    taken = [f"127.0.0.1:{port}/{proto}" for port, proto in DEMO_PORTS
             if not port_free(port, proto)]
    assert not taken, (f"the quick start's demo backends need {', '.join(taken)} (fixed by "
                       "rules/main.rules), but another program holds them: stop it and rerun")
    binds = {"QS_TCP_BIND": f"127.0.0.1:{free_port()}",
             "QS_UDP_BIND": f"127.0.0.1:{free_port(socket.SOCK_DGRAM)}",
             "QS_METRICS_BIND": f"127.0.0.1:{free_port()}"}
    env = {**os.environ, **binds, "QS_WORKERS": "1", "PYTHON": sys.executable}
    run = subprocess.run(["bash", "tools/quickstart.sh", "--once"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=90)
    out = run.stdout + run.stderr
    assert run.returncode == 0, out
    assert "every demo connection reached the expected backend" in run.stdout
    assert run.stdout.count("\n    ok\n") == 4 and "NOT AS EXPECTED" not in run.stdout, out
    answers = re.findall(r"answered by: backend=(\S+)", run.stdout)
    assert answers[1] == "api" and answers[-1] == "dns", answers
    # eight TLS connections to pool web (weights 3:1): exactly 6 and 2
    assert "tally: web-a=6 web-b=2" in run.stdout, out
    # everything it started is gone: the ports are free again
    for port, proto in DEMO_PORTS:
        assert port_free(port, proto), f"{port}/{proto} still held after the quick start"
    for value in binds.values():
        port = int(value.rsplit(":", 1)[1])
        assert port_free(port, "udp" if value == binds["QS_UDP_BIND"] else "tcp"), value
