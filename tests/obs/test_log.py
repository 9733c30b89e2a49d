"""Tests for dynproxy.obs.log: JSON/text lines, the access log, transition and flood logs."""

import io
import json
import logging
import re

import pytest

from dynproxy.obs import log as L
from dynproxy.obs.log import (
    OnceLogger,
    access_log,
    format_ts,
    log_transition,
    setup_logging,
)

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
ACCESS_FIELDS = {"client": "10.0.0.1:5555", "listener": "tcp-main", "proto": "tcp",
                 "sni": "api.example.com", "rule": "rules/main.rules:3", "backend": "web-1",
                 "bytes_up": 517, "bytes_down": 4096, "duration_ms": 12.3456, "end": "closed"}


@pytest.fixture
def capture():
    """setup_logging into a buffer; returns a function that configures and the buffer."""
    buf = io.StringIO()
    root = logging.getLogger()
    level = root.level

    def configure(level="info", fmt="json", **kw):
        return setup_logging(level, fmt, stream=buf, **kw)

    yield configure, buf
    for handler in [h for h in root.handlers if isinstance(h, L._OurHandler)]:
        root.removeHandler(handler)
    L._installed.handler = None
    root.setLevel(level)
    logging.getLogger(L.ACCESS_LOGGER).setLevel(logging.NOTSET)


def lines(buf: io.StringIO) -> list[str]:
    return buf.getvalue().splitlines()


def test_json_line_has_time_level_logger_msg_and_extra_fields(capture):
    configure, buf = capture
    configure()
    logging.getLogger("dynproxy.test").warning("backend %s down", "web-1",
                                               extra={"pool": "web", "fails": 3})
    (line,) = lines(buf)
    record = json.loads(line)
    assert TS.match(record.pop("time"))
    assert record == {"level": "warning", "logger": "dynproxy.test", "msg": "backend web-1 down",
                      "pool": "web", "fails": 3}


def test_json_line_carries_the_exception(capture):
    configure, buf = capture
    configure()
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        logging.getLogger("dynproxy.test").exception("failed")
    (line,) = lines(buf)
    assert "RuntimeError: kaput" in json.loads(line)["exc"]


def test_level_filters_and_second_setup_replaces_the_handler(capture):
    configure, buf = capture
    configure("info")
    configure("WARNING")
    logger = logging.getLogger("dynproxy.test")
    logger.info("hidden")
    logger.error("shown")
    assert [json.loads(x)["msg"] for x in lines(buf)] == ["shown"]


def test_text_format(capture):
    configure, buf = capture
    configure(fmt="text")
    logging.getLogger("dynproxy.test").info("redis up", extra={"url": "redis://h:1/0",
                                                               "note": "two words"})
    (line,) = lines(buf)
    assert re.match(r"^\S+Z INFO dynproxy.test: redis up url=redis://h:1/0 "
                    r'note="two words"$', line), line


@pytest.mark.parametrize("level, fmt, message", [
    ("loud", "json", "unknown log level 'loud'"),
    ("info", "xml", "unknown log format 'xml'; expected one of ('json', 'text')"),
])
def test_bad_level_or_format_is_named(capture, level, fmt, message):
    configure, _ = capture
    with pytest.raises(ValueError, match=re.escape(message)):
        configure(level, fmt)


def test_format_ts_is_iso_utc_with_milliseconds():
    assert format_ts(0.123) == "1970-01-01T00:00:00.123Z"
    assert format_ts(86400 + 61.5) == "1970-01-02T00:01:01.500Z"
    assert format_ts(0.999) == "1970-01-01T00:00:00.999Z"


def test_access_log_writes_one_json_line_with_every_field(capture):
    configure, buf = capture
    configure("error")  # the general level does not silence access lines
    access_log(**ACCESS_FIELDS, time_s=0.25, worker=2)
    (line,) = lines(buf)
    record = json.loads(line)
    expected = dict(ACCESS_FIELDS, duration_ms=12.346, time="1970-01-01T00:00:00.250Z",
                    logger="dynproxy.access", worker=2)
    assert record == expected


def test_access_log_reaches_other_handlers_too(capture, caplog):
    configure, buf = capture
    configure()
    with caplog.at_level(logging.INFO, logger=L.ACCESS_LOGGER):
        access_log(**ACCESS_FIELDS, time_s=0.25)
    (ours,) = lines(buf)
    (record,) = [r for r in caplog.records if r.name == L.ACCESS_LOGGER]
    assert record.getMessage() == ours
    assert json.loads(ours)["end"] == "closed"


def test_access_log_is_json_in_text_mode_too(capture):
    configure, buf = capture
    configure(fmt="text")
    access_log(**dict(ACCESS_FIELDS, sni=None, backend=None, end="no_backend"))
    record = json.loads(lines(buf)[0])
    assert (record["sni"], record["backend"], record["end"]) == (None, None, "no_backend")
    assert TS.match(record["time"])


def test_every_json_line_carries_its_time_under_time(capture):
    configure, buf = capture
    configure()
    logging.getLogger("dynproxy.test").info("started")
    access_log(**dict(ACCESS_FIELDS, proto="udp"), time_s=0.25)
    fast = L.AccessLines()
    fast.tcp_line(0.25, "10.0.0.1:5555", '"tcp-main"', None, "null", "null", 1, 2, 0.001,
                  "closed")
    fast.flush()
    records = [json.loads(x) for x in lines(buf)]
    assert len(records) == 3
    for record in records:
        assert TS.match(record["time"]) and "ts" not in record, record


def test_access_log_can_be_switched_off(capture):
    configure, buf = capture
    configure(access=False)
    access_log(**ACCESS_FIELDS)
    assert lines(buf) == []


def test_access_log_rejects_an_unknown_end(capture):
    configure, _ = capture
    configure()
    with pytest.raises(ValueError, match="end='finished'"):
        access_log(**dict(ACCESS_FIELDS, end="finished"))


def test_transition_logs_once_per_change(capture):
    configure, buf = capture
    configure()
    once = OnceLogger("dynproxy.redis")
    states = ["down", "down", "down", "up", "up", "down"]
    logged = [once.transition("redis", s, "redis is %s", s) for s in states]
    assert logged == [True, False, False, True, False, True]
    records = [json.loads(x) for x in lines(buf)]
    assert [(r["msg"], r["state"]) for r in records] == [
        ("redis is down", "down"), ("redis is up", "up"), ("redis is down", "down")]


def test_transition_keys_are_independent_and_forgettable():
    once = OnceLogger("dynproxy.test")
    assert once.transition("a", 1, "a")
    assert once.transition("b", 1, "b")
    assert not once.transition("a", 1, "a")
    once.forget("a")
    assert once.transition("a", 1, "a")


def test_once_per_logs_first_then_a_summary_per_interval(capture):
    configure, buf = capture
    configure()
    now = [100.0]
    once = OnceLogger("dynproxy.net", clock=lambda: now[0])
    results = []
    for t in (100.0, 100.5, 101.0, 109.9, 110.0, 110.1, 125.0):
        now[0] = t
        results.append(once.once_per("bad_hello", 10.0, "malformed ClientHello"))
    assert results == [True, False, False, False, True, False, True]
    records = [json.loads(x) for x in lines(buf)]
    assert [r.get("suppressed") for r in records] == [None, 3, 1]
    assert {r["level"] for r in records} == {"warning"}


def test_key_memory_is_bounded():
    once = OnceLogger("dynproxy.test", max_keys=3)
    for key in range(10):
        once.transition(key, "x", "m")
    assert len(once._states) <= 3


def test_module_level_transition_uses_the_given_logger(capture):
    configure, buf = capture
    configure()
    target = logging.getLogger("dynproxy.store.redis")
    assert log_transition(("t", id(buf)), "up", "redis up", logger=target, url="redis://x")
    assert not log_transition(("t", id(buf)), "up", "redis up", logger=target)
    (line,) = lines(buf)
    assert json.loads(line)["logger"] == "dynproxy.store.redis"
    assert json.loads(line)["url"] == "redis://x"
