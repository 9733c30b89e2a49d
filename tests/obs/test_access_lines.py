"""TCP access lines from the hot path (`ACCESS_LINES`): the same JSON as `access_log`,
written in one write per flush when our handler is the only destination, and handed to
logging line by line when something else listens too.
"""

from __future__ import annotations

import io
import json
import logging

import pytest

from dynproxy.obs import log as L
from dynproxy.obs.log import AccessLines, access_log, json_text, set_access_fields, setup_logging

FIELDS = {"client": "10.0.0.1:5555", "listener": "tcp:127.0.0.1:8080", "proto": "tcp",
          "sni": "api.example.com", "rule": 'rules/"odd" main.rules:3', "backend": "wéb-1",
          "bytes_up": 517, "bytes_down": 4096, "end": "closed"}


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


@pytest.fixture
def ours():
    stream = CountingStream()
    setup_logging("info", "json", stream=stream)
    set_access_fields(worker=3)
    yield stream
    set_access_fields()
    root = logging.getLogger()
    root.removeHandler(L._installed.handler)
    L._installed.handler = None
    logging.getLogger(L.ACCESS_LOGGER).setLevel(logging.NOTSET)


def queue(lines: AccessLines, duration: float = 0.0123456, **changes) -> None:
    f = dict(FIELDS, **changes)
    lines.tcp_line(0.25, f["client"], json_text(f["listener"]), f["sni"], json_text(f["rule"]),
                   json_text(f["backend"]), f["bytes_up"], f["bytes_down"], duration, f["end"])


def test_a_tcp_line_is_the_access_log_line(ours):
    lines = AccessLines()
    queue(lines)
    lines.flush()
    access_log(**dict(FIELDS, duration_ms=12.3456), time_s=0.25)
    fast, reference = (json.loads(x) for x in ours.getvalue().splitlines())
    assert fast == reference
    assert fast["worker"] == 3 and fast["duration_ms"] == 12.346


def test_no_sni_no_rule_no_backend_and_tiny_durations_are_valid_json(ours):
    lines = AccessLines()
    queue(lines, duration=0.0, sni=None, rule=None, backend=None, end="rejected")
    queue(lines, duration=3.0000004)
    lines.flush()
    first, second = (json.loads(x) for x in ours.getvalue().splitlines())
    assert (first["sni"], first["rule"], first["backend"], first["duration_ms"]) == (
        None, None, None, 0.0)
    assert second["duration_ms"] == 3000.0


def test_a_flush_writes_every_queued_line_at_once(ours, monkeypatch):
    # as in production: our handler alone (pytest adds capturing handlers of its own)
    monkeypatch.setattr(logging.root, "handlers", [L._installed.handler])
    lines = AccessLines()
    for port in range(5):
        queue(lines, client=f"10.0.0.1:{port}")
    assert ours.getvalue() == ""
    lines.flush()
    assert ours.writes == 1
    assert [json.loads(x)["client"] for x in ours.getvalue().splitlines()] == [
        f"10.0.0.1:{port}" for port in range(5)]
    lines.flush()  # nothing queued: nothing written
    assert ours.writes == 1


def test_other_handlers_get_each_line_through_logging(ours, caplog):
    lines = AccessLines()
    with caplog.at_level(logging.INFO, logger=L.ACCESS_LOGGER):
        queue(lines)
        queue(lines, end="reset")
        lines.flush()
    records = [r.getMessage() for r in caplog.records if r.name == L.ACCESS_LOGGER]
    assert [json.loads(r)["end"] for r in records] == ["closed", "reset"]
    assert ours.getvalue().splitlines() == records
