"""The master's monitoring endpoint (/metrics, /healthz, /backends) across reloads.

/metrics aggregates every worker (multiprocess mode); /healthz answers from the
master's lifecycle state (503 while starting, draining or stopping); /backends is the
master's view of the topology, the one its health checks and Redis watcher keep. A
reload that moves monitoring.metrics_bind opens the new address before closing the old.
"""

from __future__ import annotations

import logging

from dynproxy.obs.http import start_http
from dynproxy.proc.ports import holder_of
from dynproxy.proc.startup import StartError

log = logging.getLogger("dynproxy.master")

__all__ = ["Monitoring"]


class Monitoring:
    def __init__(self, master) -> None:
        self.master = master
        self.server = None
        self.bind: tuple[str, int] | None = None

    def apply(self, config, previous) -> None:
        """Serve as `config` says. At start (previous None) a failure is a StartError;
        on reload it is logged and the old endpoint kept."""
        mon = config.monitoring
        wanted = (mon.metrics_bind.host, mon.metrics_bind.port) if mon.enable_metrics else None
        if wanted == self.bind:
            return
        try:
            server = self._start(wanted) if wanted is not None else None
        except OSError as exc:
            if previous is None:
                raise StartError(str(exc)) from None
            log.error("reload: %s; /metrics stays where it was", exc)
            return
        self.close()
        self.server, self.bind = server, wanted
        if previous is not None:
            log.info("monitoring endpoint now %s", self.where())

    def _start(self, bind: tuple[str, int]):
        master = self.master
        return start_http(bind, master.metrics, lambda: master.state, self.backends_view,
                          holder_of=holder_of)

    def backends_view(self) -> dict:
        """The master's topology (it runs the health checks and Redis watcher) with the
        open connections its workers report (they carry the traffic)."""
        active: dict[str, int] = {}
        for handle in self.master.workers.values():
            for member, count in handle.active.items():
                active[member] = active.get(member, 0) + count
        return self.master.serving.current.topology.snapshot(active)

    def where(self) -> str:
        if self.bind is None:
            return "off"
        host, port = self.bind
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        if self.server is not None:
            self.server.stop(timeout=0.2)
            self.server = None
