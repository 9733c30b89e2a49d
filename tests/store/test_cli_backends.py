"""`dynproxy backends ...` against a real redis-server: what it writes, validates,
prints and announces."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from dynproxy.cli.main import cli


@pytest.fixture
def run(redis_server, prefix):
    runner = CliRunner()

    def invoke(*args, url=None):
        result = runner.invoke(cli, ["backends", "--redis", url or redis_server.url,
                                     "--prefix", prefix, *args], catch_exceptions=False)
        return result.exit_code, result.output
    return invoke


@pytest.fixture
def listen(redis_server, prefix):
    """Subscribes to the change channel; returns a function reading what arrived."""
    pubsub = redis_server.client().pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("proxy:backends:changes")

    def messages():
        out = []
        while (m := pubsub.get_message(timeout=0.5)) is not None:
            out.append(json.loads(m["data"]))
        return out

    pubsub.get_message(timeout=1)  # the subscribe confirmation
    yield messages
    pubsub.close()


def test_add_writes_the_operators_json_and_announces_it(run, redis_server, prefix, listen):
    code, out = run("add", "web-1", "127.0.0.1:9001")
    assert code == 0, out
    stored = redis_server.client().get(f"{prefix}backends:web-1")
    assert json.loads(stored) == {"address": "127.0.0.1:9001", "weight": 100, "healthy": True,
                                  "last_check": None, "metadata": {}}
    assert f"added {prefix}backends:web-1" in out
    assert "web-1" in out and "127.0.0.1:9001" in out and "NAME" in out
    assert listen() == [{"op": "add", "names": ["web-1"], "by": "dynproxy backends"}]


def test_add_options(run, redis_server, prefix):
    code, out = run("add", "web-2", "[::1]:9002", "--weight", "5", "--unhealthy",
                    "--metadata", '{"zone": "a"}', "--ttl", "100")
    assert code == 0, out
    key = f"{prefix}backends:web-2"
    assert json.loads(redis_server.client().get(key)) == {
        "address": "[::1]:9002", "weight": 5, "healthy": False, "last_check": None,
        "metadata": {"zone": "a"}}
    assert 90 < redis_server.client().ttl(key) <= 100
    code, out = run("add", "web-2", "127.0.0.1:9002")
    assert code == 0 and f"replaced {key}" in out


@pytest.mark.parametrize("args, shown", [
    (("web-1", "127.0.0.1"), "is not HOST:PORT"),
    (("web-1", "127.0.0.1:99999"), "is not HOST:PORT"),
    (("web 1", "127.0.0.1:9001"), "must be 1..253 printable"),
    (("web-1", "127.0.0.1:9001", "--weight", "-1"),
     "'-1' is not a weight: write a whole number in 0..1000000"),
    (("web-1", "127.0.0.1:9001", "--ttl", "0"),
     "'0' is not a time to live in seconds: write a whole number of at least 1, e.g. --ttl 60"),
    (("web-1", "127.0.0.1:9001", "--metadata", "[1]"), "must be a JSON object"),
    (("web-1", "127.0.0.1:9001", "--metadata", "{x"), "is not JSON"),
])
def test_add_validates_before_writing(run, redis_server, prefix, args, shown):
    code, out = run("add", *args)
    assert code == 2 and shown in out, out
    assert redis_server.client().keys(f"{prefix}*") == []


def test_list_shows_valid_and_invalid_keys(run, redis_server, prefix):
    run("add", "web-1", "127.0.0.1:9001")
    redis_server.client().set(f"{prefix}backends:broken", "{nope")
    code, out = run("list")
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "ADDRESS", "WEIGHT", "HEALTHY", "LAST", "CHECK", "TTL"]
    assert lines[1].split()[:2] == ["broken", "(invalid)"]
    assert lines[2].split()[:4] == ["web-1", "127.0.0.1:9001", "100", "yes"]
    assert "! broken: skipped by proxies:" in out and "is not JSON" in out
    code, out = run("list", "--json", "web-*")
    assert [row["name"] for row in json.loads(out)] == ["web-1"]
    code, out = run("list", "nothing-*")
    assert code == 0 and "(no backends)" in out


def test_set_weight_and_drain_change_only_the_weight(run, redis_server, prefix, listen):
    key = f"{prefix}backends:web-1"
    redis_server.client().set(key, '{"address": "127.0.0.1:9001", "weight": 7, '
                                   '"healthy": false, "last_check": 5, "metadata": {"k": []}}')
    assert run("drain", "web-1")[0] == 0
    assert json.loads(redis_server.client().get(key)) == {
        "address": "127.0.0.1:9001", "weight": 0, "healthy": False, "last_check": 5,
        "metadata": {"k": [], "drained_weight": 7}}
    code, out = run("set-weight", "web-1", "9")
    assert code == 0 and "9" in out
    assert json.loads(redis_server.client().get(key))["metadata"] == {"k": []}
    assert [m["op"] for m in listen()] == ["drain", "set-weight"]


def test_missing_backends_exit_1(run, redis_server, prefix):
    for args in (("set-weight", "nope", "3"), ("drain", "nope"), ("rm", "nope")):
        code, out = run(*args)
        assert code == 1 and "no such backend" in out, out
    assert redis_server.client().keys(f"{prefix}*") == []


def test_rm_removes_and_announces(run, redis_server, prefix, listen):
    run("add", "web-1", "127.0.0.1:9001")
    run("add", "web-2", "127.0.0.1:9002")
    listen()
    code, out = run("rm", "web-1", "web-2")
    assert code == 0 and out.count("removed") == 2
    assert redis_server.client().keys(f"{prefix}*") == []
    assert listen() == [{"op": "rm", "names": ["web-1", "web-2"], "by": "dynproxy backends"}]


def test_unreachable_redis_is_one_clear_line(run):
    code, out = run("list", url="redis://:hunter2@127.0.0.1:1/0")
    assert code == 1 and "failed" in out and "--redis" in out
    assert "hunter2" not in out and "Traceback" not in out


def test_config_and_bad_url(run, redis_server, prefix, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"redis:\n  url: {redis_server.url}\n  key_prefix: '{prefix}'\n")
    result = CliRunner().invoke(cli, ["backends", "--config", str(cfg), "add", "x",
                                      "127.0.0.1:1"])
    assert result.exit_code == 0, result.output
    assert redis_server.client().exists(f"{prefix}backends:x") == 1
    code, out = run("list", url="http://nope")
    assert code == 2 and "is not a URL" in out


def test_the_command_is_lazily_registered():
    out = subprocess.run([sys.executable, "-m", "dynproxy", "backends", "--help"],
                         capture_output=True, text=True, check=True).stdout
    for command in ("list", "add", "rm", "set-weight", "drain"):
        assert command in out
