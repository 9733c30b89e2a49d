"""tools/bench end to end, shortest form: the short-connection workload once, with one
worker, against direct, HAProxy, nginx stream and dynproxy (real processes on 127.0.0.1;
needs haproxy, nginx with libnginx-mod-stream, wrk, iperf3, cc and matplotlib, which
tools/install-test-deps.sh installs). Plus the parsing of wrk's report."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))

from benchlib.loads import parse_wrk  # noqa: E402

TARGETS = ("direct", "haproxy", "nginx", "dynproxy")
NUMBER = re.compile(r"^\d[\d,]*(\.\d+)?$")

WRK_OUTPUT = """\
Running 2s test @ http://127.0.0.1:40000/
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     6.43ms    2.19ms  31.12ms   86.21%
    Req/Sec     4.90k   401.13     5.60k    70.00%
  Latency Distribution
     50%  850.00us
     75%    6.80ms
     90%    8.43ms
     99%    1.20s
  19582 requests in 2.00s, 4.56MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 4
Requests/sec:   9790.12
Transfer/sec:      2.28MB
"""


def test_wrk_report_is_read_in_microseconds_with_every_error_counted():
    result = parse_wrk(WRK_OUTPUT)
    assert result.rate == pytest.approx(9790.12)
    assert result.requests == 19582
    assert result.p50_us == pytest.approx(850.0)
    assert result.p99_us == pytest.approx(1.2e6)
    assert result.errors == 10


def _table_rows(markdown: str, title: str) -> dict[str, list[str]]:
    """The rows of the table under `### title`, by their first cell."""
    section = markdown.split(f"### {title}", 1)[1].split("\n\n", 2)[1]
    rows = {}
    for line in section.splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells
    return rows


@pytest.mark.timeout(90)
def test_quick_short_connection_run_has_a_number_for_every_target(tmp_path):
    out = tmp_path / "bench.md"
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench"), "--quick", "--only", "b",
         "--workers", "1", "--out", str(out), "--no-install"],
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = out.read_text()
    rows = _table_rows(text, "Short connections (wrk, Connection: close)")
    assert set(TARGETS) <= set(rows), rows
    for target in TARGETS:
        rate, ratio_to_direct = rows[target][2], rows[target][-1]
        assert NUMBER.match(rate) and float(rate.replace(",", "")) > 0, rows[target]
        assert ratio_to_direct.endswith("x"), rows[target]
    assert NUMBER.match(rows["dynproxy"][7]), "dynproxy's CPU per connection is missing"
    assert "Short connections (wrk, Connection: close)" in done.stdout
    assert "dynproxy --workers 1: " in text  # the processes seen are reported
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
