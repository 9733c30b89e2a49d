"""SIGHUP in the master: build-then-swap, for the master and then for every worker.

1. Build the new snapshot off to the side (config validated; rules parsed, linted,
   compiled; new listener addresses checked free). Anything wrong: log why with the
   diagnostics, count proxy_reloads_total{result="failed"}, keep serving the old one.
2. Swap the master's own snapshot and apply what the master owns: logging, the
   monitoring endpoint, the pid file, the jobs (health checks, Redis).
3. Send the validated bundle to every worker and wait for each to build and swap it
   (in-flight connections keep their snapshot; listeners stay open unless dropped).
4. Start or retire workers when server.workers changed.
"""

from __future__ import annotations

import logging
import time

import gevent

from dynproxy.core.config import ConfigError
from dynproxy.lang.diagnostics import RulesError
from dynproxy.obs.log import setup_logging
from dynproxy.proc import notify
from dynproxy.proc.bundle import build_recorded
from dynproxy.proc.startup import StartError, check_binds, log_warnings, worker_count

log = logging.getLogger("dynproxy.master")

__all__ = ["describe_failure", "reload"]

RELOAD_TIMEOUT = 10.0  # seconds every worker gets to answer


def reload(master) -> None:
    previous = master.serving.current
    began = time.monotonic()
    master.set_state("reloading")
    notify.reloading()
    log.info("SIGHUP: reloading %s (serving generation %d)", master.src.rules_path,
             previous.generation)
    try:
        # In a native thread, so health checks and /metrics go on meanwhile; errors come
        # back as values (gevent's pool would print a raw traceback for a raised one).
        outcome = gevent.get_hub().threadpool.apply(_build_or_error, (master.src, previous))
        if isinstance(outcome, Exception):
            raise outcome
        snapshot, bundle = outcome
        check_binds(snapshot.config.server, previous.config.server)
    except Exception as exc:  # noqa: BLE001 - whatever it is, the old state keeps serving
        _finish(master, ok=False, why=describe_failure(exc), generation=previous.generation)
        return
    log_warnings(snapshot)
    master.serving.swap(snapshot)
    master.bundle = bundle
    _apply_to_master(master, snapshot.config, previous.config)
    problems = _reload_workers(master, bundle, master.job_state())
    _resize(master, worker_count(snapshot.config.server.workers))
    master.metrics.config_generation.set(snapshot.generation)
    took = (time.monotonic() - began) * 1000
    if problems:
        _finish(master, ok=False, why="; ".join(problems), generation=snapshot.generation)
    else:
        _finish(master, ok=True, why=f"in {took:.0f} ms", generation=snapshot.generation)


def _build_or_error(src, previous):
    try:
        return build_recorded(src, previous)
    except Exception as exc:  # noqa: BLE001 - handed back to the caller, which reports it
        return exc


def describe_failure(exc: Exception) -> str:
    if isinstance(exc, RulesError):
        return exc.render().rstrip("\n")
    if isinstance(exc, (ConfigError, StartError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def _finish(master, ok: bool, why: str, generation: int) -> None:
    master.metrics.reloads_total.labels("ok" if ok else "failed").inc()
    if ok:
        log.info("reloaded: generation %d %s", generation, why,
                 extra={"event": "reloaded", "generation": generation})
    else:
        log.error("reload failed, still serving generation %d:\n%s", generation, why,
                  extra={"event": "reload_failed", "generation": generation})
    master.set_state("serving")
    notify.ready(f"serving generation {generation}")


def _apply_to_master(master, config, previous) -> None:
    mon, old = config.monitoring, previous.monitoring
    if (mon.log_level, mon.log_format, mon.access_log) != (
            old.log_level, old.log_format, old.access_log):
        setup_logging(mon.log_level, mon.log_format, access=mon.access_log)
    master.monitoring.apply(config, previous)
    try:
        master.use_pid_file(config.server.pid_file)
    except StartError as exc:
        log.error("reload: %s; keeping the old pid file", exc)
    if master.jobs is not None:
        master.jobs.reconfigure(master.serving)


def _reload_workers(master, bundle, events: list) -> list[str]:
    """Send the bundle to every worker; the reasons of those that did not take it."""
    message = bundle.to_message()
    pending = [(h, h.reload(message, events)) for h in master.workers.values()
               if h.alive and not h.retiring]
    deadline = time.monotonic() + RELOAD_TIMEOUT
    problems = []
    for handle, reply in pending:
        try:
            reason = reply.get(timeout=max(0.0, deadline - time.monotonic()))
        except gevent.Timeout:
            reason = f"no answer within {RELOAD_TIMEOUT:.0f}s"
        if reason is not None:
            problems.append(f"worker {handle.slot} (pid {handle.pid}) still serves "
                            f"generation {handle.generation}: {reason}")
    return problems


def _resize(master, wanted: int) -> None:
    serving = sorted(s for s, h in master.workers.items() if not h.retiring)
    master.wanted = wanted
    for slot in range(wanted):
        if slot not in serving:
            log.info("server.workers is now %d: starting worker %d", wanted, slot)
            master.start_replacement(slot)
    timeout = master.serving.current.config.shutdown.drain_timeout
    for slot in serving[wanted:]:
        log.info("server.workers is now %d: draining worker %d", wanted, slot)
        handle = master.workers[slot]
        handle.retiring = True
        handle.drain(timeout)
