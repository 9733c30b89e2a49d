"""Hot-path metric cells: plain numbers pushed to prometheus-client in one go, exactly
what the same updates made one by one would give, never before a quiet spell ends and
at most every `interval` while busy, with hooks (the access lines) run after the push.
"""

from __future__ import annotations

import pytest

from dynproxy.obs.metrics import init_metrics
from dynproxy.obs.metrics_batch import Batch

DURATIONS = [0.0005, 0.001, 0.004, 0.3, 2.0, 7000.0, 0.001]


class FakeLoop:
    """Records what the batch asks of a gevent loop; `run()` plays it."""

    def __init__(self) -> None:
        self.soon: list = []
        self.timers: list = []

    def run_callback(self, fn) -> None:
        self.soon.append(fn)

    def timer(self, after: float):
        loop = self

        class Timer:
            def start(self, fn) -> None:
                loop.timers.append((after, fn))

            def close(self) -> None:
                pass

        return Timer()

    def run(self) -> None:
        soon, self.soon = self.soon, []
        for fn in soon:
            fn()


def sample(metrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_cells_push_exactly_what_direct_updates_give():
    direct, batched = init_metrics(None), init_metrics(None)
    batched.batch.bind(FakeLoop())
    for d in DURATIONS:
        direct.request_duration_seconds.labels("tcp").observe(d)
        batched.batch.cell(batched.request_duration_seconds, "tcp").observe(d)
        direct.requests_total.labels("tcp", "closed").inc()
        batched.batch.cell(batched.requests_total, "tcp", "closed").inc()
    direct.active_connections.labels("tcp").inc(3)
    direct.active_connections.labels("tcp").dec(1)
    gauge = batched.batch.cell(batched.active_connections, "tcp")
    gauge.inc(3)
    gauge.dec(1)
    assert sample(batched, "proxy_requests_total", proto="tcp", result="closed") in (None, 0)
    batched.batch.flush()
    for name, labels in [("proxy_requests_total", {"proto": "tcp", "result": "closed"}),
                         ("proxy_active_connections", {"proto": "tcp"}),
                         ("proxy_request_duration_seconds_count", {"proto": "tcp"}),
                         ("proxy_request_duration_seconds_sum", {"proto": "tcp"})]:
        assert sample(batched, name, **labels) == pytest.approx(sample(direct, name, **labels))
    for le in ("0.001", "0.005", "0.25", "0.5", "2.5", "3600.0", "+Inf"):
        labels = {"proto": "tcp", "le": le}
        assert sample(batched, "proxy_request_duration_seconds_bucket", **labels) == \
            sample(direct, "proxy_request_duration_seconds_bucket", **labels), le


def test_unbound_batch_pushes_every_update_at_once():
    metrics = init_metrics(None)
    metrics.batch.cell(metrics.requests_total, "tcp", "reset").inc()
    assert sample(metrics, "proxy_requests_total", proto="tcp", result="reset") == 1


def test_first_update_after_a_quiet_spell_is_pushed_this_iteration_then_at_most_every_interval():
    metrics = init_metrics(None)
    loop = FakeLoop()
    batch = metrics.batch
    batch.bind(loop)
    cell = batch.cell(metrics.requests_total, "tcp", "closed")
    cell.inc()
    cell.inc()
    assert len(loop.soon) == 1 and loop.timers == []  # one push, at the iteration's end
    loop.run()
    assert sample(metrics, "proxy_requests_total", proto="tcp", result="closed") == 2
    cell.inc()  # right after a push: wait for the rest of the interval
    assert loop.soon == [] and len(loop.timers) == 1
    after, fn = loop.timers[0]
    assert 0 < after <= batch.interval
    fn()
    assert sample(metrics, "proxy_requests_total", proto="tcp", result="closed") == 3


def test_hooks_run_after_the_push_and_see_its_values():
    metrics = init_metrics(None)
    batch = metrics.batch
    loop = FakeLoop()
    batch.bind(loop)
    seen = []
    batch.after_flush(lambda: seen.append(
        sample(metrics, "proxy_requests_total", proto="tcp", result="closed")))
    batch.cell(metrics.requests_total, "tcp", "closed").inc()
    assert seen == []
    loop.run()
    assert seen == [1]


def test_cells_are_made_once_per_label_set_and_the_cache_is_bounded(monkeypatch):
    metrics = init_metrics(None)
    batch = metrics.batch
    assert batch.cell(metrics.requests_total, "tcp", "closed") is \
        batch.cell(metrics.requests_total, "tcp", "closed")
    monkeypatch.setattr(Batch, "MAX_CELLS", 3)
    for i in range(10):
        batch.cell(metrics.routing_decisions_total, f"r{i}", "forward").inc()
    assert len(batch._cells) <= 3
    assert sample(metrics, "proxy_routing_decisions_total", rule="r9", action="forward") == 1
