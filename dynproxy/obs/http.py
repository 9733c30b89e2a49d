"""The monitoring HTTP endpoint on the metrics port (gevent pywsgi).

GET /metrics   Prometheus text (aggregated over workers in multiprocess mode), with
               proxy_backend_health matched to the members of the /backends view
GET /healthz   200 "ok" while serving or reloading; 503 and the state name otherwise
GET /backends  JSON from the caller's callable (pools, members, health)
anything else  404 (405 for a known path with a method other than GET/HEAD)

No per-request access log (scrapes every few seconds are noise); failures are logged to
`dynproxy.obs.http`. This module never decides the proxy's state: it asks `state_fn`.
"""

from __future__ import annotations

import errno
import json
import logging
import socket as _stdsocket
from typing import Any, Callable

from gevent import socket
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer
from prometheus_client import generate_latest
from prometheus_client.core import GaugeMetricFamily

from dynproxy.obs.log import log_once_per
from dynproxy.obs.metrics import CONTENT_TYPE, Metrics, render_metrics

__all__ = ["HEALTHY_STATES", "MonitoringApp", "start_http"]

log = logging.getLogger("dynproxy.obs.http")

HEALTHY_STATES = frozenset({"serving", "reloading"})
MAX_CLIENTS = 32  # scrapers and health checkers, not traffic
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"

Reply = tuple[str, str, bytes]  # status line, content type, body


class MonitoringApp:
    """The WSGI application: three read-only routes."""

    def __init__(self, metrics: Metrics | None, state_fn: Callable[[], str],
                 backends_fn: Callable[[], Any] | None) -> None:
        self._state_fn = state_fn
        self._backends_fn = backends_fn
        self._metrics = metrics
        self._routes: dict[str, Callable[[], Reply]] = {"/healthz": self._healthz}
        if metrics is not None:
            self._routes["/metrics"] = self._render_metrics
        if backends_fn is not None:
            self._routes["/backends"] = self._backends

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        status, ctype, body = self._reply(environ["REQUEST_METHOD"], environ["PATH_INFO"])
        start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(body))),
                                ("Cache-Control", "no-store")])
        return [b"" if environ["REQUEST_METHOD"] == "HEAD" else body]

    def _reply(self, method: str, path: str) -> Reply:
        route = self._routes.get(path)
        if route is None:
            return "404 Not Found", _TEXT, f"not found: {path!r}; try /metrics, /healthz, " \
                                           f"/backends\n".encode()
        if method not in ("GET", "HEAD"):
            return "405 Method Not Allowed", _TEXT, f"{method} not allowed; use GET\n".encode()
        try:
            return route()
        except Exception:
            log.exception("monitoring endpoint %s failed", path)
            return "500 Internal Server Error", _TEXT, b"internal error; see the proxy log\n"

    def _healthz(self) -> Reply:
        state = self._state_fn()
        if state in HEALTHY_STATES:
            return "200 OK", _TEXT, b"ok\n"
        return "503 Service Unavailable", _TEXT, f"{state}\n".encode()

    def _render_metrics(self) -> Reply:
        members = self._members()
        if members is None:
            body, ctype = render_metrics(self._metrics)
            return "200 OK", ctype, body
        body = generate_latest(WithMemberHealth(self._metrics, members))
        return "200 OK", CONTENT_TYPE, body

    def _members(self) -> dict[tuple[str, str], int] | None:
        """The members proxy_backend_health shows (None: as the processes set it)."""
        if self._backends_fn is None:
            return None
        try:
            return member_health(self._backends_fn())
        except Exception as exc:  # /metrics must not fail with the /backends view
            log_once_per("metrics-members", 60.0, "/metrics: no member list (%r); "
                         "proxy_backend_health shows what the processes set", exc)
            return None

    def _backends(self) -> Reply:
        body = json.dumps(self._backends_fn(), default=str, indent=2).encode() + b"\n"
        return "200 OK", _JSON, body


HEALTH_FAMILY = "proxy_backend_health"
NO_POOL = "-"  # the pool label of a backend that is in no pool (as passive health reports it)


def member_health(view: dict) -> dict[tuple[str, str], int]:
    """(pool, backend) -> 1/0 for every member of every pool, and (NO_POOL, backend) for
    a backend in no pool, from a /backends view (`Topology.snapshot`)."""
    series = {(pool, m["id"]): int(bool(m["healthy"]))
              for pool, spec in view.get("pools", {}).items() for m in spec["members"]}
    pooled = {backend for _, backend in series}
    series.update({(NO_POOL, name): int(bool(b["healthy"]))
                   for name, b in view.get("backends", {}).items() if name not in pooled})
    return series


class WithMemberHealth:
    """The metrics to scrape, with proxy_backend_health made to match the members the
    caller has now: one series per member, even one nobody has set (no active checks,
    never marked down by passive health: the /backends view's value), and none for a
    member that has left its pool (a worker's multiprocess files still hold its last
    value; they cannot forget one series). A value some process set (an active check,
    a worker's passive health) wins over the view's."""

    def __init__(self, metrics: Metrics, members: dict[tuple[str, str], int]) -> None:
        self.metrics, self.members = metrics, members

    def collect(self):
        found = False
        for family in self.metrics.scrape_registry.collect():
            if family.name == HEALTH_FAMILY:
                found, family = True, self._health(family.samples)
            yield family
        if not found:
            yield self._health(())

    def _health(self, samples) -> GaugeMetricFamily:
        [described] = self.metrics.backend_health.metric.describe()
        set_by_someone = {(s.labels.get("pool"), s.labels.get("backend")): s.value
                          for s in samples}
        family = GaugeMetricFamily(HEALTH_FAMILY, described.documentation,
                                   labels=("pool", "backend"))
        for key in sorted(self.members):
            family.add_metric(key, set_by_someone.get(key, self.members[key]))
        return family


def start_http(bind: tuple[str, int], metrics: Metrics | None, state_fn: Callable[[], str],
               backends_fn: Callable[[], Any] | None = None,
               holder_of: Callable[[str, int], tuple[int, str] | None] | None = None,
               ) -> WSGIServer:
    """Listen on `bind` (IPv4 or IPv6 host, port; port 0 picks one) and serve in the
    current gevent hub. Returns the started server: `.server_port` is the bound port,
    `.stop(timeout)` stops it. /metrics is absent when `metrics` is None, /backends
    when `backends_fn` is None. `holder_of(proto, port)` -> (pid, command line) or None
    names the process holding a taken port in the error (proc/ports.holder_of; obs does
    not import proc)."""
    listener = _listen(bind, holder_of)
    app = MonitoringApp(metrics, state_fn, backends_fn)
    server = WSGIServer(listener, app, log=None, error_log=log, spawn=Pool(MAX_CLIENTS))
    server.start()
    return server


class EndpointBindError(OSError):
    """The monitoring endpoint cannot listen. Its text says which address, why and what
    to do, without the `[Errno N]` prefix an OSError prints."""

    def __str__(self) -> str:
        return self.strerror


def _listen(bind: tuple[str, int], holder_of=None) -> socket.socket:
    host, port = bind[0].strip("[]"), bind[1]
    family = _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET
    sock = socket.socket(family, _stdsocket.SOCK_STREAM)
    sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        holder = None
        if holder_of is not None and err.errno == errno.EADDRINUSE:
            holder = holder_of("tcp", port)
        raise EndpointBindError(err.errno, bind_failure(host, port, err, holder)) from err
    return sock


ELSEWHERE = ("choose another address (--metrics-bind HOST:PORT, or monitoring.metrics_bind "
             "in the config), or turn the endpoint off (monitoring.enable_metrics: false)")


def bind_failure(host: str, port: int, err: OSError,
                 holder: tuple[int, str] | None = None) -> str:
    """Why the endpoint cannot listen on host:port, and what the operator can do;
    `holder`: (pid, command line) of the process holding the port, when known."""
    shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"cannot serve /metrics, /healthz and /backends on {shown}"
    if err.errno == errno.EADDRINUSE:
        who = "another process" if holder is None else f"pid {holder[0]} ({holder[1]})"
        return (f"{head}: the address is already in use by {who} "
                f"(`ss -ltnp 'sport = :{port}'` shows which); stop that process, {ELSEWHERE}")
    if err.errno == errno.EACCES:
        return (f"{head}: permission denied (ports below 1024 need privileges); {ELSEWHERE}")
    if err.errno == errno.EADDRNOTAVAIL:
        return f"{head}: {host!r} is not an address of this host; {ELSEWHERE}"
    return f"{head}: {err.strerror or err}; {ELSEWHERE}"
