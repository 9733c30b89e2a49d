"""The master process: validates, starts and watches the workers, obeys signals.

It builds every snapshot first (rules parsed, linted, compiled; config validated), so
bad rules never reach a worker; workers get the validated texts over their channel.
It serves /metrics (aggregated over workers), /healthz and /backends, and runs the
background jobs (health checks, Redis watcher) once, forwarding their events to every
worker. Signal handlers only enqueue; the loop in `run` dispatches `handle_<signal>`,
as gunicorn's arbiter does.

    SIGTERM, SIGINT  graceful: stop accepting, drain up to shutdown.drain_timeout, exit 0;
                     a second one during the drain switches to fast
    SIGQUIT          fast: close everything, exit within a second
    SIGHUP           reload rules, config and certificates (a bad one is reported, kept out)
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import tempfile
import time

import gevent
from gevent.pool import Group
from gevent.queue import Empty, Queue

from dynproxy.core.backoff import ExponentialBackoff
from dynproxy.net.state import Serving
from dynproxy.obs.log import setup_logging
from dynproxy.obs.metrics import init_metrics, worker_died
from dynproxy.proc import notify
from dynproxy.proc.build import Sources
from dynproxy.proc.bundle import build_recorded
from dynproxy.proc.jobs import apply_event
from dynproxy.proc.monitoring import Monitoring
from dynproxy.proc.pidfile import PidFileError, remove_pid_file, write_pid_file
from dynproxy.proc.reload import reload
from dynproxy.proc.startup import StartError, check_binds, log_warnings, make_jobs, worker_count
from dynproxy.proc.worker_handle import WorkerHandle, WorkerStartFailed, describe_exit

log = logging.getLogger("dynproxy.master")

__all__ = ["Master", "StartError"]

START_TIMEOUT = 30.0  # seconds for every worker to say "ready"
STOP_GRACE = 3.0  # seconds past the drain timeout before workers are killed
FAST_GRACE = 0.5  # seconds a fast stop waits for workers before killing them
STABLE_AFTER = 10.0  # a worker up this long resets its slot's backoff
RESTART_BACKOFF = ExponentialBackoff(base=0.5, cap=30.0, jitter="equal")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)


class Master:
    def __init__(self, src: Sources) -> None:
        self.src = src
        self.inbox: Queue = Queue()  # ("signal", signum) | ("exited", handle) | ("respawn", slot)
        self.state = "starting"
        self.workers: dict[int, WorkerHandle] = {}
        self.wanted = 0  # how many workers should serve
        self.failures: dict[int, int] = {}  # slot -> deaths in a row, for the backoff
        self.restarts = Group()  # pending respawns
        self.metrics_dir: str | None = None
        self.metrics = None
        self.jobs = None
        self.monitoring: Monitoring | None = None
        self.pid_file: str | None = None

    # starting -------------------------------------------------------------------------------
    def run(self) -> int:
        """Serve until stopped; returns the exit code. RulesError/ConfigError/StartError
        propagate before anything is started."""
        snapshot, self.bundle = build_recorded(self.src)
        self.serving = Serving(snapshot)
        self._setup_logging()
        log_warnings(snapshot)
        check_binds(snapshot.config.server, None)
        self.metrics_dir = tempfile.mkdtemp(prefix="dynproxy-metrics-")
        try:
            return self._run()
        except BaseException:
            if any(h.alive for h in self.workers.values()):
                self._halt_workers(FAST_GRACE)  # never leave workers without a master
            raise
        finally:
            self._clean_up()

    def _run(self) -> int:
        cfg = self.serving.current.config
        self.metrics = init_metrics(self.metrics_dir, wipe=True)
        self.set_state("starting")
        self.use_pid_file(cfg.server.pid_file)
        for sig in (*STOP_SIGNALS, signal.SIGHUP):
            gevent.signal_handler(sig, self.inbox.put, ("signal", sig))
        self.monitoring = Monitoring(self)
        self.monitoring.apply(cfg, None)
        self.jobs = make_jobs(cfg, self.metrics, self.publish)
        self.jobs.start(self.serving)  # jobs wiring (Redis helper): once, in the master
        self.wanted = worker_count(cfg.server.workers)
        self._start_workers(self.wanted)
        self.metrics.config_generation.set(self.serving.current.generation)
        self.set_state("serving")
        notify.ready(f"serving with {len(self.workers)} worker(s)")
        log.info("serving %s with %d worker(s): tcp %s, udp %s, metrics %s", self.src.rules_path,
                 len(self.workers), [str(b) for b in cfg.server.tcp_bind],
                 [str(u.bind) for u in cfg.server.udp_bind], self.monitoring.where())
        return self._loop()

    def _start_workers(self, count: int) -> None:
        log.info("starting %d worker(s)", count)
        for slot in range(count):
            self._spawn(slot)
        deadline = time.monotonic() + START_TIMEOUT
        for handle in list(self.workers.values()):
            try:
                handle.started.get(timeout=max(0.0, deadline - time.monotonic()))
            except WorkerStartFailed as exc:
                self._abort_start(f"worker {handle.slot} cannot start: {exc}")
            except gevent.Timeout:
                self._abort_start(f"worker {handle.slot} did not start within {START_TIMEOUT}s")

    def _abort_start(self, reason: str) -> None:
        self._halt_workers(FAST_GRACE)
        raise StartError(reason)

    def _spawn(self, slot: int) -> WorkerHandle:
        handle = WorkerHandle(slot, self.metrics_dir, self._on_exit)
        self.workers[slot] = handle
        handle.spawn(self.bundle.to_message(), self.job_state())
        return handle

    def job_state(self) -> list:
        """The jobs' full state, for a worker to apply before it serves a snapshot."""
        return self.jobs.state_events() if self.jobs is not None else []

    def set_state(self, state: str) -> None:
        self.state = state
        self.metrics.set_lifecycle_state(state)
        log.info("state: %s", state, extra={"state": state})

    def use_pid_file(self, path: str | None) -> None:
        """Write `path` (on start, or when a reload changes server.pid_file)."""
        if path == self.pid_file:
            return
        if path is not None:
            try:
                write_pid_file(path)
            except PidFileError as exc:
                raise StartError(str(exc)) from None
        if self.pid_file is not None:
            remove_pid_file(self.pid_file)
        self.pid_file = path

    def _setup_logging(self) -> None:
        mon = self.serving.current.config.monitoring
        setup_logging(mon.log_level, mon.log_format, access=mon.access_log)

    # the loop ------------------------------------------------------------------------------
    def _loop(self) -> int:
        while self.state != "stopped":
            kind, item = self.inbox.get()
            if kind == "signal":
                getattr(self, f"handle_{signal.Signals(item).name[3:].lower()}")()
            elif kind == "exited":
                self._on_worker_exit(item)
            elif kind == "respawn":
                self._respawn(item)
        return 0

    def _on_exit(self, handle: WorkerHandle) -> None:
        """From the handle's watcher greenlet: hand it to the loop."""
        self.inbox.put(("exited", handle))

    def publish(self, event: dict) -> None:
        """A job's event (health change, Redis members) goes into the master's topology
        (for /backends) and to every worker, in order."""
        apply_event(self.serving.current.topology, event, self.metrics)
        message = {"op": "event", "event": event}
        for handle in self.workers.values():
            handle.send(message)

    # signals -------------------------------------------------------------------------------
    def handle_hup(self) -> None:
        reload(self)

    def handle_term(self) -> None:
        self._stop_graceful(signal.SIGTERM)

    def handle_int(self) -> None:
        self._stop_graceful(signal.SIGINT)

    def handle_quit(self) -> None:
        self._stop_fast()

    # workers dying -------------------------------------------------------------------------
    def _on_worker_exit(self, handle: WorkerHandle) -> None:
        worker_died(handle.pid, self.metrics_dir)
        if self.workers.get(handle.slot) is not handle:
            return  # already replaced
        if handle.retiring or self.state not in ("serving", "reloading"):
            log.info("worker %d (pid %d) exited: %s", handle.slot, handle.pid,
                     describe_exit(handle.returncode))
            if handle.retiring:
                del self.workers[handle.slot]
            return
        failures = 1 if handle.uptime() >= STABLE_AFTER else self.failures.get(handle.slot, 0) + 1
        self.failures[handle.slot] = failures
        delay = RESTART_BACKOFF.compute(failures)
        log.error("worker %d (pid %d) died (%s); restarting it in %.1fs", handle.slot,
                  handle.pid, describe_exit(handle.returncode), delay,
                  extra={"worker": handle.slot, "pid": handle.pid})
        self.restarts.add(gevent.spawn_later(delay, self.inbox.put, ("respawn", handle.slot)))

    def _respawn(self, slot: int) -> None:
        if self.state not in ("serving", "reloading"):
            return
        if slot >= self.wanted:  # server.workers went down meanwhile
            self.workers.pop(slot, None)
            return
        self.metrics.worker_restarts_total.inc()
        self.start_replacement(slot)

    def start_replacement(self, slot: int) -> None:
        """Start a worker in `slot` while serving; its failure is logged, not fatal."""
        handle = self._spawn(slot)
        gevent.spawn(self._report_start, handle)

    @staticmethod
    def _report_start(handle: WorkerHandle) -> None:
        try:
            handle.started.get()
        except WorkerStartFailed as exc:
            log.error("worker %d cannot start: %s", handle.slot, exc)

    # stopping ------------------------------------------------------------------------------
    def _stop_graceful(self, sig: int) -> None:
        timeout = self.serving.current.config.shutdown.drain_timeout
        self.set_state("draining")
        notify.stopping("draining")
        log.info("%s: stopping gracefully; draining connections for up to %ss (send it "
                 "again, or SIGQUIT, to stop at once)", signal.Signals(sig).name, timeout)
        self.restarts.kill(block=False)
        for handle in self.workers.values():
            handle.drain(timeout)
        self._wait_workers(time.monotonic() + timeout + STOP_GRACE, hurry_on_signal=True)
        self._finish()

    def _stop_fast(self) -> None:
        self.set_state("stopping")
        notify.stopping("stopping")
        log.info("SIGQUIT: stopping now")
        self._halt_workers(FAST_GRACE)
        self._finish()

    def _halt_workers(self, grace: float) -> None:
        self.restarts.kill(block=False)
        for handle in self.workers.values():
            handle.stop()
        self._wait_workers(time.monotonic() + grace, hurry_on_signal=False)

    def _wait_workers(self, deadline: float, hurry_on_signal: bool) -> None:
        """Until every worker has exited or the deadline passes (then kill the rest).
        A stop signal meanwhile turns a drain into a fast stop."""
        while any(h.alive for h in self.workers.values()):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            try:
                kind, item = self.inbox.get(timeout=min(left, 0.1))
            except Empty:
                continue
            if kind == "signal" and item == signal.SIGHUP:
                log.warning("SIGHUP ignored: the proxy is stopping")
            elif kind == "signal" and item in STOP_SIGNALS and hurry_on_signal:
                log.warning("%s during the drain: closing every connection now",
                            signal.Signals(item).name)
                self.set_state("stopping")
                for handle in self.workers.values():
                    handle.stop()
                deadline, hurry_on_signal = time.monotonic() + FAST_GRACE, False
        for handle in self.workers.values():
            if handle.alive:
                log.error("worker %d (pid %d) did not stop in time; killing it", handle.slot,
                          handle.pid)
                handle.kill()
        for handle in self.workers.values():
            handle.exited.wait(timeout=1.0)

    def _finish(self) -> None:
        self.set_state("stopping")
        for handle in self.workers.values():
            worker_died(handle.pid, self.metrics_dir)
        if self.jobs is not None:
            self.jobs.stop()
        self.state = "stopped"

    def _clean_up(self) -> None:
        if self.monitoring is not None:
            self.monitoring.close()
        if self.pid_file is not None:
            remove_pid_file(self.pid_file)
        if self.metrics_dir:
            shutil.rmtree(self.metrics_dir, ignore_errors=True)
        log.info("stopped (pid %d)", os.getpid())
