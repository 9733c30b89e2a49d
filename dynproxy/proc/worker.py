"""A worker process: serves what the master validated, until the master says stop.

    python -m dynproxy.proc.worker --index N --channel-fd FD --metrics-dir DIR

Started by the master as a fresh interpreter (never a fork of a running gevent hub).
Its first message on the channel is the bundle to serve; it opens its own listeners
with SO_REUSEPORT, says "ready", then obeys the channel: bundle (reload), event
(health/Redis change from the master's jobs), drain, stop. It never reads rule or
config files itself: a file edited after the master checked it cannot reach here.

Signals: SIGTERM drains this worker, SIGQUIT stops it at once; SIGINT and SIGHUP are
ignored (a terminal's Ctrl-C reaches the whole process group: the master decides).
Signal handlers only record the signal; the loop in `Worker.run` acts on it.
"""

from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import sys  # noqa: E402

import gevent  # noqa: E402
from gevent.queue import Queue  # noqa: E402

from dynproxy.obs.log import set_access_fields, setup_logging  # noqa: E402
from dynproxy.obs.metrics import init_metrics  # noqa: E402
from dynproxy.proc.bundle import Bundle, build_from_bundle  # noqa: E402
from dynproxy.proc.channel import Channel  # noqa: E402
from dynproxy.proc.jobs import apply_event  # noqa: E402
from dynproxy.proc.serve import Server  # noqa: E402

log = logging.getLogger("dynproxy.worker")

EXIT_CANNOT_START = 3  # the master reads the "failed" message for the reason
_HURRY_OPS = frozenset({"stop"})


ACTIVE_REPORT_INTERVAL = 1.0  # seconds


class _WorkerField(logging.Filter):
    """Every log line of a worker says which worker wrote it."""

    def __init__(self, index: int) -> None:
        super().__init__()
        self.index = index

    def filter(self, record: logging.LogRecord) -> bool:
        record.worker = self.index
        return True


class Worker:
    def __init__(self, index: int, channel: Channel, metrics_dir: str | None) -> None:
        self.index = index
        self.channel = channel
        self.metrics_dir = metrics_dir
        self.inbox: Queue = Queue()
        self.server: Server | None = None

    # starting -------------------------------------------------------------------------
    def run(self, bundle: Bundle, events: list) -> int:
        try:
            snapshot = build_from_bundle(bundle)
            self._setup_logging(snapshot.config)
            metrics = init_metrics(self.metrics_dir)
            self._apply_all(snapshot.topology, events, metrics)
            self.server = Server(snapshot, metrics, reuse_port=True, report_lifecycle=False)
            self.server.open_listeners()
        except Exception as exc:  # noqa: BLE001 - reported to the master, which explains
            return self._cannot_start(exc)
        for sig in (signal.SIGTERM, signal.SIGQUIT):
            gevent.signal_handler(sig, self.inbox.put, ("signal", sig))
        self.server.start()
        metrics.config_generation.set(snapshot.generation)
        self.channel.send({"op": "ready", "pid": os.getpid(), "generation": bundle.generation})
        gevent.spawn(self._read_channel)
        gevent.spawn(self._report_active)
        return self._loop()

    def _report_active(self) -> None:
        """Tell the master each member's open connections here (for GET /backends),
        when they changed, at most once a second."""
        last: dict = {}
        while True:
            gevent.sleep(ACTIVE_REPORT_INTERVAL)
            counts = {m.id: m.active for m in self.server.serving.current.topology.members.values()
                      if m.active}
            if counts != last:
                self.channel.send({"op": "active", "counts": counts})
                last = counts

    def _cannot_start(self, exc: Exception) -> int:
        self.channel.send({"op": "failed", "error": str(exc), "kind": type(exc).__name__})
        self.channel.flush(2.0)
        return EXIT_CANNOT_START

    def _setup_logging(self, config) -> None:
        mon = config.monitoring
        handler = setup_logging(mon.log_level, mon.log_format, access=mon.access_log)
        handler.addFilter(_WorkerField(self.index))
        set_access_fields(worker=self.index)

    # the loop ---------------------------------------------------------------------------
    def _read_channel(self) -> None:
        while True:
            message = self.channel.receive()
            if message is None:
                self.inbox.put(("eof", None))
                return
            self.inbox.put(("message", message))

    def _loop(self) -> int:
        while not self.server.stopped:
            kind, item = self.inbox.get()
            if kind == "signal":
                self._on_signal(item)
            elif kind == "eof":
                log.warning("the master has gone away; draining and exiting")
                self._drain(self.server.serving.current.config.shutdown.drain_timeout)
            else:
                self._on_message(item)
        log.info("worker %d stopped", self.index)
        self.channel.flush(1.0)
        return 0

    def _on_signal(self, sig: int) -> None:
        if sig == signal.SIGQUIT:
            self.server.stop_fast()
        else:
            self._drain(self.server.serving.current.config.shutdown.drain_timeout)

    def _on_message(self, message: dict) -> None:
        op = message.get("op")
        if op == "bundle":
            self._reload(Bundle.from_message(message["bundle"]), message.get("events", []))
        elif op == "event":
            self._apply_all(self.server.serving.current.topology, [message["event"]],
                            self.server.metrics)
        elif op == "drain":
            self._drain(float(message["timeout"]))
        elif op == "stop":
            self.server.stop_fast()
        else:
            log.error("unknown message from the master: %r", op)

    # reload, events, drain --------------------------------------------------------------
    def _reload(self, bundle: Bundle, events: list) -> None:
        server = self.server
        try:
            # In a native thread: a big rule set takes a second or more to compile, and
            # the hub must go on relaying meanwhile (the GIL is shared, not held).
            snapshot = gevent.get_hub().threadpool.apply(
                build_from_bundle, (bundle, server.serving.current))
            # Redis members and health first: the new topology must not serve a
            # moment without them (build-then-swap).
            self._apply_all(snapshot.topology, events, server.metrics)
            server.swap(snapshot)
        except Exception as exc:  # noqa: BLE001 - a bad reload keeps the old state
            log.error("reload to generation %d failed, still serving generation %d: %s",
                      bundle.generation, server.serving.current.generation, exc)
            self.channel.send({"op": "reload_failed", "generation": bundle.generation,
                               "error": str(exc)})
            return
        self._setup_logging(snapshot.config)
        log.info("serving generation %d", snapshot.generation)
        self.channel.send({"op": "reloaded", "generation": bundle.generation})

    @staticmethod
    def _apply_all(topology, events: list, metrics) -> None:
        for event in events:
            try:
                apply_event(topology, event, metrics)
            except Exception as exc:  # noqa: BLE001 - one bad event must not stop the worker
                log.error("cannot apply event %r: %r", event, exc)

    def _drain(self, timeout: float) -> None:
        self.server.drain(timeout, self._hurry)

    def _hurry(self) -> bool:
        """During a drain: True on a second stop signal or the master's "stop"."""
        while not self.inbox.empty():
            kind, item = self.inbox.get_nowait()
            if kind == "signal" or (kind == "message" and item.get("op") in _HURRY_OPS):
                return True
            if kind == "message" and item.get("op") == "event":
                self._apply_all(self.server.serving.current.topology, [item["event"]],
                                self.server.metrics)
        return False


def main(argv: list[str] | None = None) -> int:
    # A terminal's Ctrl-C (SIGINT) and hangup (SIGHUP) reach the whole process group;
    # the master turns them into orders over the channel.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    parser = argparse.ArgumentParser(prog="dynproxy.proc.worker")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--channel-fd", type=int, required=True)
    parser.add_argument("--metrics-dir")
    args = parser.parse_args(argv)
    channel = Channel(socket.socket(fileno=args.channel_fd), f"worker {args.index}")
    first = channel.receive()
    if first is None or first.get("op") != "bundle":
        print(f"dynproxy worker {args.index}: no bundle from the master (got {first!r}); "
              "workers are started by `dynproxy run`, not by hand", file=sys.stderr)
        return 2
    worker = Worker(args.index, channel, args.metrics_dir)
    return worker.run(Bundle.from_message(first["bundle"]), first.get("events", []))


if __name__ == "__main__":
    sys.exit(main())
