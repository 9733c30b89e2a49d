"""The Redis watcher against a real redis-server: rescans, pub/sub, keyspace
notifications, invalid keys, and Redis going away and coming back."""

from __future__ import annotations

import json
import logging

import gevent
import pytest

from dynproxy.obs.metrics import init_metrics
from dynproxy.store.records import redis_glob
from dynproxy.store.watcher import RedisWatcher

WAIT = 5.0  # upper bound on waiting for something that should happen much sooner


def backend(port: int, weight: int = 100, **extra) -> str:
    return json.dumps({"address": f"127.0.0.1:{port}", "weight": weight, "healthy": True,
                       "last_check": 1234567890, "metadata": {}, **extra})


class Seen:
    """Collects the watcher's callbacks."""

    def __init__(self):
        self.records: dict = {}
        self.calls = 0
        self.names: list = []
        self.states: list = []

    def on_records(self, records):
        self.records, self.calls = records, self.calls + 1


@pytest.fixture
def watch(redis_settings):
    started = []

    def start(url, prefix, patterns=("*",), reserved=(), **changes):
        seen = Seen()
        metrics = init_metrics(None)
        watcher = RedisWatcher(redis_settings(url, prefix, **changes), metrics,
                               on_records=seen.on_records, on_names=seen.names.append,
                               on_state=seen.states.append)
        watcher.set_filter([redis_glob(p) for p in patterns], reserved)
        started.append(gevent.spawn(watcher.run))
        return watcher, seen, metrics

    yield start
    for greenlet in started:
        greenlet.kill()


def test_initial_scan_reads_many_keys_in_batches_and_only_matching_names(
        redis_server, prefix, watch, wait_for):
    r = redis_server.client()
    with r.pipeline() as pipe:
        for i in range(1200):
            pipe.set(f"{prefix}backends:web-{i}", backend(10000 + i))
        pipe.set(f"{prefix}backends:api-1", backend(9999))
        pipe.set(f"{prefix}other:web-x", backend(9998))
        pipe.execute()
    watcher, seen, metrics = watch(redis_server.url, prefix, patterns=("web-*",))
    assert wait_for(lambda: len(seen.records) == 1200, WAIT), len(seen.records)
    assert seen.records["web-7"].port == 10007
    assert "api-1" not in seen.records
    assert seen.states == [True] and metrics.redis_up._value.get() == 1


def test_plain_set_del_and_expiry_seen_by_the_rescan(redis_server, prefix, watch, wait_for):
    r = redis_server.client()
    watcher, seen, _ = watch(redis_server.url, prefix, rescan_interval=0.3)
    assert wait_for(lambda: seen.states == [True], WAIT)
    r.set(f"{prefix}backends:web-1", backend(9001))
    r.set(f"{prefix}backends:web-2", backend(9002), px=400)
    assert wait_for(lambda: set(seen.records) == {"web-1", "web-2"}, 0.3 + 0.5), seen.records
    r.delete(f"{prefix}backends:web-1")
    assert wait_for(lambda: "web-1" not in seen.records, 0.3 + 0.5), seen.records
    assert wait_for(lambda: seen.records == {}, 0.4 + 0.3 + 0.5), seen.records  # TTL


def test_a_published_change_is_seen_at_once(redis_server, prefix, watch, wait_for):
    r = redis_server.client()
    watcher, seen, _ = watch(redis_server.url, prefix, rescan_interval=60)
    assert wait_for(lambda: seen.states == [True], WAIT)
    r.set(f"{prefix}backends:web-1", backend(9001))
    r.publish(f"{prefix}changes", json.dumps({"op": "add", "names": ["web-1"]}))
    assert wait_for(lambda: "web-1" in seen.records, 1.0), "not seen within 1 s"
    assert seen.names == [["web-1"]]


def test_keyspace_notifications_are_used_when_on(redis_factory, prefix, watch, wait_for):
    server = redis_factory()
    server.client().config_set("notify-keyspace-events", "K$gx")
    watcher, seen, _ = watch(server.url, prefix, rescan_interval=60)
    assert wait_for(lambda: seen.states == [True], WAIT)
    server.client().set(f"{prefix}backends:web-1", backend(9001))
    assert wait_for(lambda: "web-1" in seen.records, 1.0), "not seen within 1 s"
    assert ["web-1"] in seen.names


def test_invalid_keys_are_skipped_once_per_problem(redis_server, prefix, watch, wait_for,
                                                   caplog):
    caplog.set_level(logging.INFO, logger="dynproxy.redis")
    r = redis_server.client()
    r.set(f"{prefix}backends:good", backend(9001))
    r.set(f"{prefix}backends:broken", "{not json")
    r.set(f"{prefix}backends:negative", backend(9002, weight=-5))
    watcher, seen, metrics = watch(redis_server.url, prefix, rescan_interval=0.1)
    assert wait_for(lambda: set(seen.records) == {"good"}, WAIT)
    r.set(f"{prefix}backends:other", backend(9003))  # forces rescans with changes
    assert wait_for(lambda: "other" in seen.records, WAIT)
    gevent.sleep(0.5)  # several more rescans of the same bad values
    skipped = [rec for rec in caplog.records if "skipping Redis key" in rec.getMessage()]
    assert sorted(rec.reason for rec in skipped) == ["bad_weight", "invalid_json"]
    counter = metrics.redis_skipped_keys_total
    assert counter.labels("invalid_json")._value.get() == 1
    assert counter.labels("bad_weight")._value.get() == 1
    r.set(f"{prefix}backends:broken", backend(9004, weight="heavy"))  # a new problem
    assert wait_for(lambda: counter.labels("bad_weight")._value.get() == 2, WAIT)
    r.set(f"{prefix}backends:broken", backend(9004))  # fixed
    assert wait_for(lambda: "broken" in seen.records, WAIT)
    assert any("valid again" in rec.getMessage() for rec in caplog.records)


def test_names_owned_by_the_rules_are_skipped(redis_server, prefix, watch, wait_for):
    redis_server.client().set(f"{prefix}backends:a", backend(9001))
    redis_server.client().set(f"{prefix}backends:b", backend(9002))
    watcher, seen, metrics = watch(redis_server.url, prefix, reserved=("a",))
    assert wait_for(lambda: set(seen.records) == {"b"}, WAIT)
    assert metrics.redis_skipped_keys_total.labels("name_conflict")._value.get() == 1
    watcher.set_filter([redis_glob("*")], ())  # the rules dropped backend a
    assert set(seen.records) == {"a", "b"}


def test_redis_down_keeps_the_last_records_and_resyncs_on_return(
        redis_factory, prefix, watch, wait_for, caplog):
    caplog.set_level(logging.INFO, logger="dynproxy.redis")
    server = redis_factory()
    server.client().set(f"{prefix}backends:web-1", backend(9001))
    watcher, seen, metrics = watch(server.url, prefix, rescan_interval=0.2)
    assert wait_for(lambda: "web-1" in seen.records, WAIT)
    server.stop()
    assert wait_for(lambda: seen.states == [True, False], WAIT), seen.states
    assert metrics.redis_up._value.get() == 0
    gevent.sleep(1.0)  # many failed reconnects: no more lines, records kept
    assert set(seen.records) == {"web-1"}
    server.start()
    server.client().set(f"{prefix}backends:web-2", backend(9002))  # made meanwhile
    assert wait_for(lambda: set(seen.records) == {"web-2"}, WAIT), seen.records
    assert seen.states == [True, False, True]
    assert metrics.redis_up._value.get() == 1
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "dynproxy.redis"
             and ("is down" in rec.getMessage() or "is up" in rec.getMessage())]
    assert len(lines) == 3, lines
