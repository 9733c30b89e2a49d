"""Numeric command-line values, through real `dynproxy` subprocesses: a negative number
is judged by its argument's type (not taken for an unknown option), and every refusal
says what the value is, the accepted range and an example, with exit status 2.

No Redis or proxy is needed: each command is refused before it connects anywhere (the
Redis URL points at a closed port so that a command that went on would fail, exit 1)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOWHERE = ["--redis", "redis://127.0.0.1:1/0"]
WEIGHT_HELP = ("is not a weight: write a whole number in 0..1000000 (0 = drained: no new "
               "connections), e.g. `dynproxy backends set-weight web-1 5`")


def dynproxy(*args: str) -> subprocess.CompletedProcess:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "dynproxy", *args], capture_output=True,
                          text=True, timeout=60, env={**os.environ, "PYTHONPATH": path})


def error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    return done.stderr.strip().splitlines()[-1]


@pytest.mark.parametrize("weight", ["-3", "-3.5", "-0.5", "-1e3", "1000001", "x", "2.5"])
def test_set_weight_explains_a_bad_weight_even_a_negative_one(weight):
    line = error_line(dynproxy("backends", *NOWHERE, "set-weight", "web-1", weight))
    assert line == f"Error: Invalid value for 'WEIGHT': {weight!r} {WEIGHT_HELP}"
    assert "No such option" not in line


def test_set_weight_still_refuses_unknown_options():
    for option in ("--bogus", "-x"):
        line = error_line(dynproxy("backends", *NOWHERE, "set-weight", "web-1", option))
        assert line == f"Error: No such option '{option}'."


def test_a_valid_weight_gets_past_the_arguments():
    for weight in ("0", "5", "1000000"):
        done = dynproxy("backends", *NOWHERE, "set-weight", "web-1", weight)
        assert done.returncode == 1, done.stderr  # it went on to Redis, which is not there
        assert done.stderr.startswith("dynproxy backends: Redis at redis://127.0.0.1:1/0 failed")


@pytest.mark.parametrize(("args", "expected"), [
    (["backends", *NOWHERE, "add", "w", "127.0.0.1:9001", "--weight", "-3"],
     "Error: Invalid value for '--weight': '-3' is not a weight: write a whole number in "
     "0..1000000 (0 = drained: no new connections), e.g. --weight 5"),
    (["backends", *NOWHERE, "add", "w", "127.0.0.1:9001", "--ttl", "-5"],
     "Error: Invalid value for '--ttl': '-5' is not a time to live in seconds: write a whole "
     "number of at least 1, e.g. --ttl 60"),
    (["stop", "--pid-file", "/nonexistent/dynproxy.pid", "--timeout", "-1"],
     "Error: Invalid value for '--timeout': '-1' is not a number of seconds: write a number "
     "above 0 (or --no-wait), e.g. --timeout 60"),
    (["stop", "--pid-file", "/nonexistent/dynproxy.pid", "--timeout", "nan"],
     "Error: Invalid value for '--timeout': 'nan' is not a number of seconds: write a number "
     "above 0 (or --no-wait), e.g. --timeout 60"),
    (["--rules", "/nonexistent.rules", "--workers", "-1"],
     "Error: Invalid value for '--workers': '-1' is not a number of workers: write a whole "
     "number in 0..1024 (0: one per CPU), e.g. --workers 4"),
    (["run", "--rules", "/nonexistent.rules", "--workers", "many"],
     "Error: Invalid value for '--workers': 'many' is not a number of workers: write a whole "
     "number in 0..1024 (0: one per CPU), e.g. --workers 4"),
])
def test_numeric_options_explain_what_they_accept(args, expected):
    assert error_line(dynproxy(*args)) == expected


def test_a_valid_timeout_gets_past_the_options():
    done = dynproxy("stop", "--pid-file", "/nonexistent/dynproxy.pid", "--timeout", "0.5")
    assert done.returncode == 1  # on to the pid file, which is not there
    assert done.stderr.startswith("dynproxy: no pid file at '/nonexistent/dynproxy.pid'")
