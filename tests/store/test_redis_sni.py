"""The built-in redis_sni plugin against a real redis-server: per-host routing, the
positive/negative cache, invalidation, Redis outages, and its bounds."""

from __future__ import annotations

import dataclasses
import json

import gevent
import pytest
import redis

from dynproxy.core.config import load_config
from dynproxy.core.router import ConnInfo
from dynproxy.core.topology import Topology
from dynproxy.lang import load_text
from dynproxy.net.routing import route
from dynproxy.net.state import Snapshot
from dynproxy.obs.metrics import init_metrics
from dynproxy.proc.jobs import apply_event
from dynproxy.store.client import make_client
from dynproxy.store.redis_sni import RedisSni

RULES = """
sni suffix ".apps.example.com" -> plugin(redis_sni)
default -> reject
"""


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


class CountingClient:
    """A real client that counts GETs (and can be told to fail like a dead Redis)."""

    def __init__(self, real):
        self.real, self.gets, self.down = real, 0, False

    def get(self, key):
        self.gets += 1
        if self.down:
            raise redis.ConnectionError("Connection refused")
        gevent.sleep(0.01)  # let concurrent lookups pile up
        return self.real.get(key)


@pytest.fixture
def sni(redis_server, redis_settings, prefix):
    settings = redis_settings(redis_server.url, prefix, cache_ttl_secs=30)
    client = CountingClient(make_client(settings))
    clock = Clock()
    plugin = RedisSni(settings, client=client, clock=clock, max_members=2)
    config = dataclasses.replace(load_config(None), redis=settings)
    rules = load_text(RULES, "<test>")
    snap = Snapshot(rules, Topology(rules.backends, rules.pools), config, 1, needs_peek=True,
                    plugins={"redis_sni": plugin})
    r = redis_server.client()

    def put(name, port=9001, **fields):
        r.set(f"{prefix}backends:{name}", json.dumps({"address": f"127.0.0.1:{port}",
                                                     "weight": 100, **fields}))

    yield snap, plugin, client, clock, put, r
    client.real.close()


def decide(snap, name):
    return route(snap, ConnInfo("tcp", "10.0.0.1", 443, name, ()), init_metrics(None))


def test_a_host_in_redis_is_routed_to_its_backend(sni):
    snap, plugin, client, clock, put, r = sni
    put("a.apps.example.com", 9001)
    decision = decide(snap, "a.apps.example.com")
    assert decision.action == "forward" and decision.targets[0].name == "a.apps.example.com"
    assert decision.rule.line == 2
    member = snap.topology.backends["a.apps.example.com"]
    assert member.spec.address == "127.0.0.1:9001" and member.spec.source == "redis"
    assert "a.apps.example.com" in snap.topology.snapshot()["backends"]  # /backends shows it
    decide(snap, "a.apps.example.com")
    assert client.gets == 1  # the second came from the cache


def test_no_key_no_opinion_and_the_negative_answer_is_cached(sni):
    snap, plugin, client, clock, put, r = sni
    assert decide(snap, "b.apps.example.com").action == "reject"  # the next rule
    put("b.apps.example.com")
    assert decide(snap, "b.apps.example.com").action == "reject"  # cached "no"
    assert client.gets == 1
    clock.now += 31  # past cache_ttl_secs
    assert decide(snap, "b.apps.example.com").action == "forward"
    assert client.gets == 2


def test_invalidation_events_apply_changes_at_once(sni):
    snap, plugin, client, clock, put, r = sni
    put("c.apps.example.com", 9001)
    assert decide(snap, "c.apps.example.com").action == "forward"
    put("c.apps.example.com", 9002)
    apply_event(snap.topology, {"kind": "changed", "names": ["c.apps.example.com"]},
                init_metrics(None))
    decide(snap, "c.apps.example.com")
    assert snap.topology.backends["c.apps.example.com"].spec.port == 9002
    r.delete(f"{plugin.prefix}backends:c.apps.example.com")
    apply_event(snap.topology, {"kind": "changed", "names": None}, init_metrics(None))
    assert decide(snap, "c.apps.example.com").action == "reject"
    assert "c.apps.example.com" not in snap.topology.backends  # forgotten


@pytest.mark.parametrize("fields", [{"healthy": False}, {"weight": 0}, {"weight": -1}])
def test_unhealthy_drained_or_invalid_values_get_no_opinion(sni, fields):
    snap, plugin, client, clock, put, r = sni
    put("d.apps.example.com", **fields)
    assert decide(snap, "d.apps.example.com").action == "reject"


def test_no_sni_never_asks_redis(sni):
    snap, plugin, client, clock, put, r = sni
    assert decide(snap, None).action == "reject"
    assert client.gets == 0


def test_concurrent_misses_share_one_read(sni):
    snap, plugin, client, clock, put, r = sni
    put("e.apps.example.com")
    results = [gevent.spawn(decide, snap, "e.apps.example.com") for _ in range(20)]
    gevent.joinall(results, raise_error=True)
    assert {g.value.action for g in results} == {"forward"}
    assert client.gets == 1


def test_redis_down_serves_stale_answers_and_pauses(sni):
    snap, plugin, client, clock, put, r = sni
    put("f.apps.example.com")
    assert decide(snap, "f.apps.example.com").action == "forward"
    clock.now += 31
    client.down = True
    assert decide(snap, "f.apps.example.com").action == "forward"  # stale, still serving
    assert decide(snap, "g.apps.example.com").action == "reject"  # unknown: no opinion
    assert client.gets == 1 + 1  # the second lookup was inside the pause
    clock.now += 2
    client.down = False
    assert decide(snap, "f.apps.example.com").action == "forward"
    assert client.gets == 3


def test_members_added_on_the_fly_are_bounded(sni):
    snap, plugin, client, clock, put, r = sni
    for name in ("h1.apps.example.com", "h2.apps.example.com", "h3.apps.example.com"):
        put(name)
        assert decide(snap, name).action == "forward"
    assert sorted(snap.topology.backends) == ["h2.apps.example.com", "h3.apps.example.com"]
    assert decide(snap, "h1.apps.example.com").action == "forward"  # cached, added again
    assert "h1.apps.example.com" in snap.topology.backends
