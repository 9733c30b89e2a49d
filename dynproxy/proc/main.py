"""Start serving from files: the single-process path (workers come in proc.master)."""

from __future__ import annotations

import logging
import sys

from dynproxy.net.tcp import BindError
from dynproxy.obs.http import start_http
from dynproxy.obs.log import setup_logging
from dynproxy.obs.metrics import init_metrics
from dynproxy.proc.build import Sources, build_snapshot
from dynproxy.proc.serve import Server

log = logging.getLogger("dynproxy")


def serve_main(src: Sources) -> int:
    snapshot = build_snapshot(src)  # raises RulesError / ConfigError before anything binds
    mon = snapshot.config.monitoring
    setup_logging(mon.log_level, mon.log_format, access=mon.access_log)
    for warning in snapshot.rules.diagnostics:
        log.warning("%s: %s[%s]: %s", warning.pos, warning.severity, warning.code,
                    warning.message)
    metrics = init_metrics(None)
    server = Server(snapshot, metrics, reloader=lambda prev: build_snapshot(src, prev))
    try:
        server.open_listeners()
        http = _start_http(server, metrics, mon)
    except (BindError, OSError) as exc:
        print(f"dynproxy: not starting: {exc}", file=sys.stderr)
        return 1
    server.install_signal_handlers()
    server.start()
    metrics.config_generation.set(snapshot.generation)
    log.info("serving %s: tcp %s, udp %s, metrics %s", src.rules_path,
             [p.name for p in server.tcp], [p.name for p in server.udp],
             f"{mon.metrics_bind.host}:{mon.metrics_bind.port}" if http else "off")
    code = server.run_forever()
    if http is not None:
        http.stop(timeout=1)
    log.info("stopped")
    return code


def _start_http(server: Server, metrics, mon):
    if not mon.enable_metrics:
        return None
    bind = (mon.metrics_bind.host, mon.metrics_bind.port)
    return start_http(bind, metrics, lambda: server.state,
                      lambda: server.serving.current.topology.snapshot())
