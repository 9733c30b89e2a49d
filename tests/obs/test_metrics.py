"""Tests for dynproxy.obs.metrics: the declared families, label caps, both modes."""

import os

import pytest
from prometheus_client import Gauge
from prometheus_client.parser import text_string_to_metric_families

from dynproxy.obs import metrics as M
from dynproxy.obs.metrics import (
    LIFECYCLE_STATES,
    OTHER,
    LabelCap,
    init_metrics,
    render_metrics,
    worker_died,
)

REQUIRED = {
    "proxy_connections_total": ("proto", "listener"),
    "proxy_bytes_transferred_total": ("direction", "proto"),
    "proxy_requests_total": ("proto", "result"),
    "proxy_backend_health": ("pool", "backend"),
    "proxy_tls_handshakes_total": ("result", "reason"),
    "proxy_active_connections": ("proto",),
    "proxy_errors_total": ("reason",),
    "proxy_request_duration_seconds": ("proto",),
    "proxy_backend_response_time_seconds": ("backend",),
    "proxy_routing_decisions_total": ("rule", "action"),
    "proxy_udp_sessions": ("listener",),
    "proxy_udp_sessions_evicted_total": ("listener",),
    "proxy_redis_up": (),
    "proxy_redis_skipped_keys_total": ("reason",),
    "proxy_reloads_total": ("result",),
    "proxy_config_generation": (),
    "proxy_lifecycle_state": ("state",),
    "proxy_worker_restarts_total": (),
    "proxy_certificate_expiry_days": ("cert",),
    "proxy_tls_sni_fallback_total": ("reason",),
    "proxy_plugin_errors_total": ("plugin", "reason"),
    "proxy_connections_refused_total": ("reason",),
}
ALLOWED_LABELS = {"rule", "pool", "backend", "proto", "listener", "reason", "result",
                  "state", "action", "direction", "cert", "plugin"}


def samples(text: bytes) -> dict[tuple, float]:
    """{(sample name, frozenset of label items): value} from an exposition."""
    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(text: bytes, name: str, **labels: str) -> float:
    return samples(text)[(name, frozenset(labels.items()))]


def touch_all(m) -> None:
    """Create one child of every labelled family so it shows up in the exposition."""
    for spec in M._SPECS:
        family = getattr(m, spec.name.removeprefix("proxy_"))
        if spec.labels:
            child = family.labels(*("x" for _ in spec.labels))
            child.observe(0.1) if spec.kind is M.Histogram else (
                child.set(1) if spec.kind is Gauge else child.inc())


def test_every_required_metric_is_declared_with_its_labels():
    declared = {s.name: s.labels for s in M._SPECS}
    for name, labels in REQUIRED.items():
        assert declared[name] == labels, name


def test_labels_are_bounded_kinds_only():
    used = {label for s in M._SPECS for label in s.labels}
    assert used <= ALLOWED_LABELS
    assert not used & {"sni", "client", "src", "address", "host"}


def test_every_gauge_uses_a_live_multiprocess_mode():
    for spec in M._SPECS:
        if spec.kind is Gauge:
            assert spec.mode.startswith("live"), spec.name
    modes = {s.name: s.mode for s in M._SPECS}
    assert modes["proxy_active_connections"] == "livesum"
    assert modes["proxy_udp_sessions"] == "livesum"


def test_render_shows_every_metric_in_text_format():
    m = init_metrics(None)
    touch_all(m)
    body, ctype = render_metrics(m)
    assert ctype.startswith("text/plain; version=0.0.4")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    for name in REQUIRED:
        assert name.removesuffix("_total") in names, name
    assert b"_created" not in body


def test_init_twice_in_one_process_gives_independent_sets():
    first, second = init_metrics(None), init_metrics(None)
    first.errors_total.labels("boom").inc(3)
    second.errors_total.labels("boom").inc()
    assert value(render_metrics(first)[0], "proxy_errors_total", reason="boom") == 3
    assert value(render_metrics(second)[0], "proxy_errors_total", reason="boom") == 1


def test_counters_gauges_histograms_record():
    m = init_metrics(None)
    m.connections_total.labels("tcp", "main").inc()
    m.connections_total.labels(proto="tcp", listener="main").inc()
    m.active_connections.labels("tcp").inc(2)
    m.active_connections.labels("tcp").dec()
    m.backend_response_time_seconds.labels("web-1").observe(0.003)
    m.redis_up.set(1)
    m.worker_restarts_total.inc()
    text = render_metrics(m)[0]
    assert value(text, "proxy_connections_total", proto="tcp", listener="main") == 2
    assert value(text, "proxy_active_connections", proto="tcp") == 1
    assert value(text, "proxy_backend_response_time_seconds_bucket",
                 backend="web-1", le="0.0025") == 0
    assert value(text, "proxy_backend_response_time_seconds_bucket",
                 backend="web-1", le="0.005") == 1
    assert value(text, "proxy_redis_up") == 1
    assert value(text, "proxy_worker_restarts_total") == 1


def test_labels_returns_the_same_cached_child():
    m = init_metrics(None)
    assert m.requests_total.labels("tcp", "ok") is m.requests_total.labels("tcp", "ok")


def test_wrong_number_of_labels_names_the_metric():
    m = init_metrics(None)
    with pytest.raises(ValueError, match="proxy_requests_total.*'proto', 'result'"):
        m.requests_total.labels("tcp")


def test_label_cap_admits_limit_then_other():
    cap = LabelCap(2)
    assert [cap("a"), cap("b"), cap("c"), cap("a")] == ["a", "b", OTHER, "a"]
    with pytest.raises(ValueError, match="at least 1, got 0"):
        LabelCap(0)


def test_rule_names_beyond_the_limit_are_counted_as_other():
    m = init_metrics(None, label_limit=3)
    for i in range(10):
        m.routing_decisions_total.labels(f"main.rules:{i}", "forward").inc()
    text = render_metrics(m)[0]
    assert value(text, "proxy_routing_decisions_total", rule=OTHER, action="forward") == 7
    assert value(text, "proxy_routing_decisions_total", rule="main.rules:2",
                 action="forward") == 1
    assert len(m.routing_decisions_total._children) == 3  # overflow keys not cached


def test_uncapped_labels_are_not_folded():
    m = init_metrics(None, label_limit=1)
    m.errors_total.labels("a").inc()
    m.errors_total.labels("b").inc()
    assert value(render_metrics(m)[0], "proxy_errors_total", reason="b") == 1


def test_lifecycle_state_sets_exactly_one():
    m = init_metrics(None)
    m.set_lifecycle_state("draining")
    text = render_metrics(m)[0]
    got = {s: value(text, "proxy_lifecycle_state", state=s) for s in LIFECYCLE_STATES}
    assert got == {s: (1.0 if s == "draining" else 0.0) for s in LIFECYCLE_STATES}
    with pytest.raises(ValueError, match="'drained'"):
        m.set_lifecycle_state("drained")


def test_remove_forgets_a_backend_series():
    m = init_metrics(None)
    m.backend_health.labels("web", "web-1").set(1)
    m.backend_health.remove("web", "web-1")
    assert ("proxy_backend_health", frozenset({("pool", "web"), ("backend", "web-1")})) \
        not in samples(render_metrics(m)[0])


def _in_child(work) -> int:
    """Fork, run work() in the child, exit 0 on success, 1 on any failure."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            work()
            code = 0
        finally:
            os._exit(code)
    return pid


def _reap(pid: int) -> None:
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_multiprocess_aggregates_forked_workers(tmp_path):
    m = init_metrics(str(tmp_path), wipe=True)
    m.set_lifecycle_state("serving")  # written by the "master"

    def worker(n):
        def work():
            m.connections_total.labels("tcp", "main").inc(n)
            m.active_connections.labels("tcp").inc(n)
            m.request_duration_seconds.labels("tcp").observe(0.02)
            m.backend_health.labels("web", "web-1").set(n % 2)
        return work

    pids = []
    for n in (1, 2):  # one after the other, so that "most recent" is well defined
        pids.append(_in_child(worker(n)))
        _reap(pids[-1])
    text = render_metrics(m)[0]
    assert value(text, "proxy_connections_total", proto="tcp", listener="main") == 3
    assert value(text, "proxy_active_connections", proto="tcp") == 3
    assert value(text, "proxy_request_duration_seconds_count", proto="tcp") == 2
    assert value(text, "proxy_backend_health", pool="web", backend="web-1") == 0  # latest
    assert value(text, "proxy_lifecycle_state", state="serving") == 1

    worker_died(pids[1])
    text = render_metrics(m)[0]
    assert value(text, "proxy_active_connections", proto="tcp") == 1
    assert value(text, "proxy_connections_total", proto="tcp", listener="main") == 3


def test_multiprocess_init_is_cached_per_directory_and_wipe_clears(tmp_path):
    m = init_metrics(str(tmp_path))
    assert init_metrics(str(tmp_path)) is m
    m.errors_total.labels("x").inc()
    assert any(n.endswith(".db") for n in os.listdir(tmp_path))
    fresh = init_metrics(str(tmp_path), wipe=True)
    assert fresh is not m
    assert ("proxy_errors_total", frozenset({("reason", "x")})) not in \
        samples(render_metrics(fresh)[0])
    fresh.errors_total.labels("y").inc()
    assert value(render_metrics(fresh)[0], "proxy_errors_total", reason="y") == 1


def test_single_mode_after_multiprocess_writes_no_files(tmp_path):
    init_metrics(str(tmp_path / "mp"), wipe=True)
    m = init_metrics(None)
    m.errors_total.labels("z").inc()
    assert os.environ.get("PROMETHEUS_MULTIPROC_DIR") is None
    written = b"".join((tmp_path / "mp" / n).read_bytes() for n in os.listdir(tmp_path / "mp"))
    assert b'"reason": "z"' not in written and b'"reason":"z"' not in written
    assert value(render_metrics(m)[0], "proxy_errors_total", reason="z") == 1
    worker_died(12345)  # no-op in single mode, must not raise
