"""The monitoring HTTP endpoint on the metrics port (gevent pywsgi).

GET /metrics   Prometheus text (aggregated over workers in multiprocess mode)
GET /healthz   200 "ok" while serving or reloading; 503 and the state name otherwise
GET /backends  JSON from the caller's callable (pools, members, health)
anything else  404 (405 for a known path with a method other than GET/HEAD)

No per-request access log (scrapes every few seconds are noise); failures are logged to
`dynproxy.obs.http`. This module never decides the proxy's state: it asks `state_fn`.
"""

from __future__ import annotations

import json
import logging
import socket as _stdsocket
from typing import Any, Callable

from gevent import socket
from gevent.pool import Pool
from gevent.pywsgi import WSGIServer

from dynproxy.obs.metrics import Metrics, render_metrics

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
        body, ctype = render_metrics(self._metrics)
        return "200 OK", ctype, body

    def _backends(self) -> Reply:
        body = json.dumps(self._backends_fn(), default=str, indent=2).encode() + b"\n"
        return "200 OK", _JSON, body


def start_http(bind: tuple[str, int], metrics: Metrics | None, state_fn: Callable[[], str],
               backends_fn: Callable[[], Any] | None = None) -> WSGIServer:
    """Listen on `bind` (IPv4 or IPv6 host, port; port 0 picks one) and serve in the
    current gevent hub. Returns the started server: `.server_port` is the bound port,
    `.stop(timeout)` stops it. /metrics is absent when `metrics` is None, /backends
    when `backends_fn` is None."""
    listener = _listen(bind)
    app = MonitoringApp(metrics, state_fn, backends_fn)
    server = WSGIServer(listener, app, log=None, error_log=log, spawn=Pool(MAX_CLIENTS))
    server.start()
    return server


def _listen(bind: tuple[str, int]) -> socket.socket:
    host, port = bind[0].strip("[]"), bind[1]
    family = _stdsocket.AF_INET6 if ":" in host else _stdsocket.AF_INET
    sock = socket.socket(family, _stdsocket.SOCK_STREAM)
    sock.setsockopt(_stdsocket.SOL_SOCKET, _stdsocket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError as err:
        sock.close()
        raise OSError(err.errno, f"cannot listen for /metrics on {host!r} port {port}: "
                      f"{err.strerror}; free the port or change monitoring.metrics_bind "
                      f"(--metrics-bind)") from err
    return sock
