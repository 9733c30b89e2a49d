"""Every Prometheus metric dynproxy exports, declared once, in one table.

Two modes: single process (a private registry per `init_metrics`), and multi-process
(prometheus-client's multiprocess mode: each forked worker writes its samples to mmap
files in one directory and the master aggregates them when `/metrics` is scraped).

Labels are bounded by construction: only rule, pool, backend, proto, listener, reason,
result, state, action, direction, cert and plugin. This module must never be handed an
SNI or a client address as a label value; names that come from operators or Redis
(rule, pool, backend, cert, plugin) are capped per process (the first `label_limit`
distinct values keep their name, later ones are counted as "other").

Hot paths call `metrics.<family>.labels(...)` once, keep the child, and then only
`inc()` / `observe()` it; `labels()` itself is one dict lookup after the first call.
Attribute names are the metric names without the `proxy_` prefix.

The TCP connection path goes further: it updates `metrics.batch` cells (plain numbers)
and the batch pushes them to prometheus-client once per event-loop iteration, since in
multiprocess mode each `inc` takes a lock, reads the pid and writes an mmap (about 1 us,
a histogram `observe` 2 us): per connection that was ~10 us, now a fraction of it. A
scrape may therefore lag the traffic by one loop iteration (microseconds when idle,
at most one batch under load); the batch is flushed at stop too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from dynproxy.obs.metrics_batch import Batch

__all__ = [
    "Batch",
    "CONTENT_TYPE",
    "LIFECYCLE_STATES",
    "OTHER",
    "Family",
    "LabelCap",
    "Metrics",
    "init_metrics",
    "render_metrics",
    "worker_died",
]

# The classic text format every Prometheus version parses (what generate_latest writes).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OTHER = "other"
DEFAULT_LABEL_LIMIT = 1000
LIFECYCLE_STATES = ("starting", "serving", "reloading", "draining", "stopping")

# Label names whose values come from operators or Redis, hence unbounded in principle.
CAPPED_LABELS = frozenset({"rule", "pool", "backend", "cert", "plugin"})

# Connections live from milliseconds to hours; connects take microseconds to seconds.
DURATION_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0, float("inf"))
CONNECT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
                   0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


@dataclass(frozen=True, slots=True)
class _Spec:
    name: str
    kind: type
    help: str
    labels: tuple[str, ...] = ()
    # Gauges only: how workers' values combine. Always a live* mode so a dead worker's
    # value vanishes with mark_process_dead instead of lingering.
    mode: str = ""
    buckets: tuple[float, ...] = ()


_SPECS = (
    _Spec("proxy_connections_total", Counter, "Connections accepted.", ("proto", "listener")),
    _Spec("proxy_bytes_transferred_total", Counter,
          "Bytes relayed; up = client to backend, down = backend to client.",
          ("direction", "proto")),
    _Spec("proxy_requests_total", Counter, "Connections and UDP sessions by outcome.",
          ("proto", "result")),
    _Spec("proxy_backend_health", Gauge, "1 when the member is healthy, 0 when down.",
          ("pool", "backend"), mode="livemostrecent"),
    _Spec("proxy_tls_handshakes_total", Counter, "TLS handshakes by result and reason.",
          ("result", "reason")),
    _Spec("proxy_active_connections", Gauge, "Connections open now.", ("proto",),
          mode="livesum"),
    _Spec("proxy_errors_total", Counter, "Errors by reason.", ("reason",)),
    _Spec("proxy_request_duration_seconds", Histogram,
          "Lifetime of a connection or UDP session.", ("proto",), buckets=DURATION_BUCKETS),
    _Spec("proxy_backend_response_time_seconds", Histogram,
          "Time to connect to a backend.", ("backend",), buckets=CONNECT_BUCKETS),
    _Spec("proxy_routing_decisions_total", Counter, "Routing decisions by deciding rule.",
          ("rule", "action")),
    _Spec("proxy_udp_sessions", Gauge, "UDP sessions in the table now.", ("listener",),
          mode="livesum"),
    _Spec("proxy_udp_sessions_evicted_total", Counter,
          "UDP sessions evicted because the table was full.", ("listener",)),
    _Spec("proxy_redis_up", Gauge, "1 when Redis answers, 0 when it does not.",
          mode="livemostrecent"),
    _Spec("proxy_redis_skipped_keys_total", Counter,
          "Redis backend keys skipped as invalid.", ("reason",)),
    _Spec("proxy_reloads_total", Counter, "Reloads by result.", ("result",)),
    _Spec("proxy_config_generation", Gauge, "Generation of the configuration in force.",
          mode="livemax"),
    _Spec("proxy_lifecycle_state", Gauge, "1 for the current lifecycle state, else 0.",
          ("state",), mode="livemostrecent"),
    _Spec("proxy_worker_restarts_total", Counter, "Worker processes restarted."),
    # min: a worker still serving an older certificate must not hide its expiry.
    _Spec("proxy_certificate_expiry_days", Gauge, "Days until the certificate expires.",
          ("cert",), mode="livemin"),
    _Spec("proxy_tls_sni_fallback_total", Counter,
          "Handshakes served the default certificate (or refused) for lack of a match.",
          ("reason",)),
    _Spec("proxy_plugin_errors_total", Counter, "Routing plugin failures.",
          ("plugin", "reason")),
    _Spec("proxy_connections_refused_total", Counter,
          "Connections refused before routing.", ("reason",)),
)


class LabelCap:
    """Admits the first `limit` distinct values of one label; later ones become OTHER."""

    __slots__ = ("limit", "_seen")

    def __init__(self, limit: int = DEFAULT_LABEL_LIMIT) -> None:
        if limit < 1:
            raise ValueError(f"label limit must be at least 1, got {limit!r}")
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: str) -> str:
        if value in self._seen:
            return value
        if len(self._seen) < self.limit:
            self._seen.add(value)
            return value
        return OTHER


class Family:
    """A labelled metric whose children are bound once and cached, with capped labels."""

    __slots__ = ("name", "metric", "labelnames", "_caps", "_children")

    def __init__(self, name: str, metric: Any, labelnames: tuple[str, ...],
                 label_limit: int) -> None:
        self.name = name
        self.metric = metric
        self.labelnames = labelnames
        self._caps = tuple(LabelCap(label_limit) if n in CAPPED_LABELS else None
                           for n in labelnames)
        self._children: dict[tuple, Any] = {}

    def labels(self, *values: Any, **by_name: Any) -> Any:
        if by_name:
            values = tuple(by_name[n] for n in self.labelnames)
        child = self._children.get(values)
        if child is None:
            child = self._bind(values)
        return child

    def remove(self, *values: Any) -> None:
        """Forget one series (single-process mode; multiprocess files keep it)."""
        key = tuple(str(v) for v in values)
        self._children.pop(tuple(values), None)
        try:
            self.metric.remove(*key)
        except KeyError:
            pass

    def _bind(self, values: tuple) -> Any:
        if len(values) != len(self.labelnames):
            raise ValueError(f"{self.name}: expected labels {self.labelnames!r}, "
                             f"got {values!r}")
        capped = tuple(str(v) if cap is None else cap(str(v))
                       for cap, v in zip(self._caps, values, strict=True))
        child = self.metric.labels(*capped)
        if capped == values:
            # Only admitted values are cached under their own key, so a flood of
            # distinct overflow values cannot grow this dict.
            self._children[values] = child
        return child


class Metrics:
    """Holds every metric: `metrics.<name without proxy_>` (a Family when labelled)."""

    __slots__ = tuple(s.name.removeprefix("proxy_") for s in _SPECS) + (
        "registry", "scrape_registry", "multiproc_dir", "batch")

    def __init__(self, multiproc_dir: str | None, label_limit: int) -> None:
        self.multiproc_dir = multiproc_dir
        self.batch = Batch()
        self.registry = CollectorRegistry(auto_describe=True)
        for spec in _SPECS:
            setattr(self, spec.name.removeprefix("proxy_"), _build(spec, self.registry,
                                                                     label_limit))
        self.scrape_registry = _scrape_registry(multiproc_dir, self.registry)

    def set_lifecycle_state(self, state: str) -> None:
        """Set proxy_lifecycle_state to 1 for `state` and 0 for every other state."""
        if state not in LIFECYCLE_STATES:
            raise ValueError(f"unknown lifecycle state {state!r}; "
                             f"expected one of {LIFECYCLE_STATES!r}")
        for name in LIFECYCLE_STATES:
            self.lifecycle_state.labels(name).set(1.0 if name == state else 0.0)


def _build(spec: _Spec, registry: CollectorRegistry, label_limit: int) -> Any:
    kwargs: dict[str, Any] = {"labelnames": spec.labels, "registry": registry}
    if spec.mode:
        kwargs["multiprocess_mode"] = spec.mode
    if spec.buckets:
        kwargs["buckets"] = spec.buckets
    metric = spec.kind(spec.name, spec.help, **kwargs)
    return Family(spec.name, metric, spec.labels, label_limit) if spec.labels else metric


def _scrape_registry(multiproc_dir: str | None, own: CollectorRegistry) -> CollectorRegistry:
    if multiproc_dir is None:
        ProcessCollector(registry=own)
        PlatformCollector(registry=own)
        return own
    scrape = CollectorRegistry()
    multiprocess.MultiProcessCollector(scrape, path=multiproc_dir)
    return scrape


class _ModeSwitch:
    """prometheus-client picks its value storage at import time from the environment;
    this switches it when init_metrics decides, and remembers one Metrics per directory
    (two sets of mmap values for the same keys in one process would overwrite each other).
    """

    def __init__(self) -> None:
        self.active_dir: str | None = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        self.by_dir: dict[tuple[str, int], Metrics] = {}

    def single(self) -> None:
        values.ValueClass = values.MutexValue
        if self.active_dir and os.environ.get("PROMETHEUS_MULTIPROC_DIR") == self.active_dir:
            del os.environ["PROMETHEUS_MULTIPROC_DIR"]
        self.active_dir = None

    def multi(self, path: str, fresh: bool) -> None:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path  # read by the mmap values and children
        stale = path != self.active_dir or not getattr(values.ValueClass, "_multiprocess", False)
        if fresh or stale:
            # A new value class has its own table of open files: after a wipe the old
            # table would keep writing into deleted files.
            values.ValueClass = values.MultiProcessValue()
            self.active_dir = path


_MODE = _ModeSwitch()


def init_metrics(multiproc_dir: str | None = None, *, wipe: bool = False,
                 label_limit: int = DEFAULT_LABEL_LIMIT) -> Metrics:
    """Create every metric.

    multiproc_dir None: single process; each call returns a fresh set on its own registry.
    multiproc_dir set: multiprocess mode; call it in the master before forking workers
    (they inherit the object and write to their own per-pid files). Repeated calls for
    the same directory in one process return the same object. `wipe=True` first deletes
    the *.db files a previous run left there (master only, before any worker starts).
    """
    # *_created series would double every scrape for a value nobody alerts on.
    disable_created_metrics()
    if multiproc_dir is None:
        _MODE.single()
        return Metrics(None, label_limit)
    path = os.path.abspath(multiproc_dir)
    os.makedirs(path, exist_ok=True)
    if wipe:
        _wipe(path)
    _MODE.multi(path, fresh=wipe)
    key = (path, label_limit)
    if wipe or key not in _MODE.by_dir:
        _MODE.by_dir[key] = Metrics(path, label_limit)
    return _MODE.by_dir[key]


def _wipe(path: str) -> None:
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.remove(os.path.join(path, name))


def render_metrics(metrics: Metrics) -> tuple[bytes, str]:
    """The Prometheus text exposition (aggregated over all workers in multiprocess mode)."""
    return generate_latest(metrics.scrape_registry), CONTENT_TYPE


def worker_died(pid: int, multiproc_dir: str | None = None) -> None:
    """Drop a dead worker's live gauges (its counters keep counting in the aggregate).

    No-op in single-process mode. Call it from the master once the worker is reaped.
    """
    path = multiproc_dir or _MODE.active_dir
    if path:
        multiprocess.mark_process_dead(pid, path)
