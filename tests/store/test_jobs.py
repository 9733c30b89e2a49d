"""Jobs in one process (events applied straight to the serving topology), against a
real redis-server and real TCP backends: Redis members, active health checks that
mark members down and up (in routing, in Redis, in metrics), write-back beside an
operator's edit, reloads that keep state, and what happens when a whole pool is down.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import types

import gevent
import pytest
from gevent.server import StreamServer

from dynproxy.core.config import load_config
from dynproxy.core.router import ConnInfo
from dynproxy.core.topology import Topology
from dynproxy.lang import load_text
from dynproxy.net.dial import DialFailed, dial
from dynproxy.net.state import Serving, Snapshot
from dynproxy.obs.metrics import init_metrics
from dynproxy.proc.jobs import Jobs, apply_event, attach_jobs, carry_redis_members

WAIT = 5.0
INTERVAL, RISE, FALL = 0.2, 2, 3
HEALTH = f"health tcp every {int(INTERVAL * 1000)}ms timeout 150ms rise {RISE} fall {FALL}"


class Backend:
    """A TCP server that can be killed (port refuses) and revived on the same port."""

    def __init__(self, port: int = 0):
        self.port = port
        self.server = None
        self.revive()

    def revive(self) -> None:
        self.server = StreamServer(("127.0.0.1", self.port), lambda s, a: s.close())
        self.server.init_socket()
        self.server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.start()
        self.port = self.server.server_port

    def kill(self) -> None:
        self.server.stop()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def stored(port: int, weight: int = 100, healthy: bool = True) -> str:
    return json.dumps({"address": f"127.0.0.1:{port}", "weight": weight, "healthy": healthy,
                       "last_check": 1234567890, "metadata": {}})


def make_snapshot(text, config, previous=None, generation=1):
    rules = load_text(text, "<test>")
    topology = Topology(rules.backends, rules.pools, previous.topology if previous else None)
    carry_redis_members(topology, previous.topology if previous else None)
    return Snapshot(rules, topology, config, generation, needs_peek=False)


@pytest.fixture
def world(redis_server, redis_settings, prefix):
    """(start(rules) -> (server, jobs, metrics), redis client, prefix); stops the jobs."""
    made = []
    config = dataclasses.replace(load_config(None), redis=redis_settings(
        redis_server.url, prefix, rescan_interval=0.2))

    def start(text):
        snap = make_snapshot(text, config)
        server = types.SimpleNamespace(serving=Serving(snap), jobs=None)
        metrics = init_metrics(None)
        jobs = attach_jobs(server, snap, metrics)
        jobs.start(server.serving)
        made.append(jobs)
        return server, jobs, metrics

    start.config = config
    yield start, redis_server.client(), prefix
    for jobs in made:
        jobs.stop()


def poll(predicate, timeout):
    with gevent.Timeout(timeout, False):
        while not predicate():
            gevent.sleep(0.02)
    return predicate()


def gauge(metrics, pool, backend):
    return metrics.backend_health.labels(pool, backend)._value.get()


def test_redis_members_join_the_pool_and_leave_it(world):
    start, r, prefix = world
    r.set(f"{prefix}backends:web-1", stored(9001))
    server, jobs, _ = start('pool web { members from redis "web-*" }\n'
                            "default -> forward(web)\n")
    pool = server.serving.current.topology.pools["web"]
    assert [m.id for m in pool.redis_members] == ["web-1"]  # read before serving
    r.set(f"{prefix}backends:web-2", stored(9002, weight=5))
    assert poll(lambda: len(pool.redis_members) == 2, WAIT)
    assert pool.redis_members[1].weight == 5
    assert pool.redis_members[1].spec.source == "redis"
    member = pool.redis_members[0]
    r.delete(f"{prefix}backends:web-1")
    assert poll(lambda: [m.id for m in pool.redis_members] == ["web-2"], WAIT)
    assert member.draining  # no new connections; open ones finish


def test_unhealthy_in_redis_keeps_a_member_out_of_an_unchecked_pool(world):
    start, r, prefix = world
    r.set(f"{prefix}backends:web-1", stored(9001, healthy=False))
    r.set(f"{prefix}backends:web-2", stored(9002))
    server, _, _ = start('pool web { members from redis "web-*" }\ndefault -> forward(web)\n')
    pool = server.serving.current.topology.pools["web"]
    assert [m.id for m in pool.redis_members] == ["web-2"]


def test_a_killed_backend_goes_down_and_comes_back(world):
    start, r, prefix = world
    static, dynamic = Backend(), Backend()
    key = f"{prefix}backends:web-1"
    r.set(key, stored(dynamic.port))
    server, jobs, metrics = start(f'pool web {{ member {static.address}\n'
                                  f'  members from redis "web-*"\n  {HEALTH} }}\n'
                                  "default -> forward(web)\n")
    topo = server.serving.current.topology
    member = topo.members["web-1"]
    assert poll(lambda: member.last_check is not None, WAIT)
    assert member.available and gauge(metrics, "web", "web-1") == 1
    r.set(key, stored(dynamic.port, weight=42))  # the operator's edit, before the check
    dynamic.kill()
    assert poll(lambda: not member.available, FALL * INTERVAL * 1.1 + 0.3), "not down in time"
    assert gauge(metrics, "web", "web-1") == 0
    assert "connect failed" in member.health.reason
    assert poll(lambda: json.loads(r.get(key))["healthy"] is False, 1.0)
    assert json.loads(r.get(key))["weight"] == 42  # survived the write-back
    assert topo.members[static.address].available  # the other member is untouched
    dynamic.revive()
    assert poll(lambda: member.available, RISE * INTERVAL * 1.1 + 0.3), "not up in time"
    assert gauge(metrics, "web", "web-1") == 1
    assert poll(lambda: json.loads(r.get(key))["healthy"] is True, 1.0)
    assert json.loads(r.get(key))["last_check"] > 1234567890


def test_reload_keeps_members_and_health(world):
    start, r, prefix = world
    dead = Backend()
    dead.kill()
    r.set(f"{prefix}backends:web-1", stored(dead.port))
    text = f'pool web {{ members from redis "web-*"\n  {HEALTH} }}\ndefault -> forward(web)\n'
    server, jobs, _ = start(text)
    old = server.serving.current
    assert poll(lambda: not old.topology.members["web-1"].available, WAIT)
    new = make_snapshot(text + "# changed\n", start.config, previous=old, generation=2)
    server.serving.swap(new)
    # carried over before the swap, and the same member object (same health)
    assert new.topology.members["web-1"] is old.topology.members["web-1"]
    jobs.reconfigure(server.serving)
    assert [m.id for m in new.topology.pools["web"].redis_members] == ["web-1"]
    assert not new.topology.members["web-1"].available


def test_state_events_describe_everything(world):
    start, r, prefix = world
    alive = Backend()
    r.set(f"{prefix}backends:web-1", stored(alive.port))
    _, jobs, _ = start(f'pool web {{ members from redis "web-*"\n {HEALTH} }}\n'
                       "default -> forward(web)\n")
    assert poll(lambda: jobs._watcher.up, WAIT)
    events = jobs.state_events()
    assert events[0] == {"kind": "redis", "up": True}
    assert events[1] == {"kind": "members", "pool": "web", "close_removed": False,
                         "backends": [{"name": "web-1", "host": "127.0.0.1",
                                       "port": alive.port, "weight": 100}]}
    assert events[2]["kind"] == "health" and events[2]["member"] == "web-1"
    json.dumps(events)  # JSON-able, for the pipe to the workers
    # a fresh worker's topology catches up from them alone
    fresh = make_snapshot(f'pool web {{ members from redis "web-*"\n {HEALTH} }}\n'
                          "default -> forward(web)\n", None).topology
    for event in events:
        apply_event(fresh, event, init_metrics(None))
    assert [m.id for m in fresh.pools["web"].redis_members] == ["web-1"]


def test_apply_event_ignores_other_generations_and_forces_health():
    topo = make_snapshot("backend a 127.0.0.1:9\npool p { member a\n health tcp }\n"
                         "default -> forward(p)\n", None).topology
    metrics = init_metrics(None)
    apply_event(topo, {"kind": "members", "pool": "gone", "backends": []}, metrics)
    apply_event(topo, {"kind": "health", "member": "nobody", "up": False}, metrics)
    apply_event(topo, {"kind": "bogus"}, metrics)
    member = topo.members["a"]
    apply_event(topo, {"kind": "health", "member": "a", "up": False, "reason": "refused",
                       "last_check": 1.0}, metrics)
    assert not member.available and member.health.reason == "refused"
    assert member.last_check == 1.0 and gauge(metrics, "p", "a") == 0
    apply_event(topo, {"kind": "health", "member": "a", "up": True, "reason": "ok",
                       "last_check": 2.0}, metrics)
    assert member.available and gauge(metrics, "p", "a") == 1


def test_jobs_without_redis_or_checks_do_nothing_and_stop_cleanly():
    published = []
    snap = make_snapshot("backend a 127.0.0.1:9\ndefault -> forward(a)\n", load_config(None))
    jobs = Jobs(snap.config, init_metrics(None), published.append)
    jobs.start(snap)
    assert jobs.state_events() == [] and len(jobs.group) == 0
    jobs.stop()
    assert published == []


# when a whole pool is down --------------------------------------------------------------------
def _all_down(text):
    snap = make_snapshot(text, load_config(None))
    for member in snap.topology.pools["web"].members:
        apply_event(snap.topology, {"kind": "health", "member": member.id, "up": False},
                    init_metrics(None))
    return snap


def test_all_members_down_uses_the_pools_fallback():
    spare = Backend()
    snap = _all_down(f"backend spare {spare.address}\n"
                     f"pool web {{ member 127.0.0.1:9\n {HEALTH}\n fallback spare }}\n"
                     "default -> forward(web)\n")
    metrics = init_metrics(None)
    decision = snap.rules.decide(src="10.0.0.1", dport=80)
    member, sock = dial(snap, decision, ConnInfo("tcp", "10.0.0.1", 80, None, ()), metrics)
    sock.close()
    assert member.id == "spare"


def test_all_members_down_without_fallback_is_a_counted_no_backend():
    snap = _all_down(f"pool web {{ member 127.0.0.1:9\n {HEALTH} }}\ndefault -> forward(web)\n")
    metrics = init_metrics(None)
    decision = snap.rules.decide(src="10.0.0.1", dport=80)
    with pytest.raises(DialFailed) as failed:
        dial(snap, decision, ConnInfo("tcp", "10.0.0.1", 80, None, ()), metrics)
    assert failed.value.end == "no_backend"
    assert metrics.errors_total.labels("no_backend")._value.get() == 1


def test_close_removed_closes_the_open_connections_of_a_member_that_left():
    rules = load_text('pool web { members from redis "web-*" }\ndefault -> forward(web)\n')
    topo = Topology(rules.backends, rules.pools)
    metrics = init_metrics(None)
    two = [{"name": n, "host": "127.0.0.1", "port": p, "weight": 1}
           for n, p in (("web-1", 9001), ("web-2", 9002))]
    apply_event(topo, {"kind": "members", "pool": "web", "backends": two}, metrics)
    closed = []
    for name in ("web-1", "web-2"):
        topo.members[name].connections.add(lambda name=name: closed.append(name))
    apply_event(topo, {"kind": "members", "pool": "web", "backends": two[1:],
                       "close_removed": False}, metrics)
    assert closed == []  # by default a removed backend's connections finish
    kept = topo.members["web-2"]
    apply_event(topo, {"kind": "members", "pool": "web", "backends": [],
                       "close_removed": True}, metrics)
    assert closed == ["web-2"] and kept.connections == set()
