"""The master's handle on one worker process: start it, talk to it, notice its end.

A worker is a fresh interpreter (`python -m dynproxy.proc.worker`), not a fork of the
master: the master runs a gevent hub with live greenlets (jobs, /metrics), and a
fork would copy them half-alive. The channel is a socketpair whose child end is the
only descriptor the worker inherits besides stdio. gevent only.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Callable

import gevent
from gevent.event import AsyncResult, Event

from dynproxy.proc.channel import Channel

log = logging.getLogger("dynproxy.master")

__all__ = ["WorkerHandle", "WorkerStartFailed"]


class WorkerStartFailed(Exception):
    """A worker could not start serving; the message is the worker's own reason."""


class WorkerHandle:
    """One worker process. `started` resolves once it serves (or fails to);
    `exited` is set when the process has ended; `on_exit(handle)` is called then."""

    def __init__(self, slot: int, metrics_dir: str | None,
                 on_exit: Callable[[WorkerHandle], None]) -> None:
        self.slot = slot
        self.metrics_dir = metrics_dir
        self.on_exit = on_exit
        self.started: AsyncResult = AsyncResult()
        self.exited = Event()
        self.reply: AsyncResult | None = None  # the pending reload's answer
        self.generation = 0  # the generation it last said it serves
        self.active: dict[str, int] = {}  # member id -> its open connections here (reported)
        self.retiring = False  # drained on purpose (fewer workers): not to be replaced
        self.pid = 0
        self.returncode: int | None = None
        self.started_at = time.monotonic()
        self.proc: subprocess.Popen | None = None
        self.channel: Channel | None = None
        self._greenlets: list[gevent.Greenlet] = []

    def spawn(self, bundle_message: dict, events: list) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(self._argv(child.fileno()), pass_fds=(child.fileno(),),
                                         env=_worker_env(), stdin=subprocess.DEVNULL)
        except OSError as exc:  # EMFILE, ENOMEM, EAGAIN: the master retries with backoff
            parent.close()
            self._not_spawned(exc)
            return
        finally:
            child.close()
        self.pid = self.proc.pid
        self.channel = Channel(parent, f"worker {self.slot} (pid {self.pid})")
        self.channel.send({"op": "bundle", "bundle": bundle_message, "events": events})
        self._greenlets = [gevent.spawn(self._read), gevent.spawn(self._watch)]
        log.info("worker %d started: pid %d", self.slot, self.pid,
                 extra={"worker": self.slot, "pid": self.pid})

    def _not_spawned(self, exc: OSError) -> None:
        self.started.set_exception(WorkerStartFailed(f"cannot start a worker process: {exc}"))
        self.exited.set()
        gevent.spawn(self.on_exit, self)

    def _argv(self, fd: int) -> list[str]:
        argv = [sys.executable, "-m", "dynproxy.proc.worker", "--index", str(self.slot),
                "--channel-fd", str(fd)]
        return argv + (["--metrics-dir", self.metrics_dir] if self.metrics_dir else [])

    # talking ------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self.proc is not None and not self.exited.is_set()

    def send(self, message: dict) -> None:
        if self.alive:
            self.channel.send(message)

    def reload(self, bundle_message: dict, events: list) -> AsyncResult:
        """Send a bundle (and the jobs' state to apply before swapping to it); the result
        resolves to None (applied) or the reason it was not."""
        self.reply = AsyncResult()
        if not self.alive:
            self.reply.set("the worker is not running")
        else:
            self.channel.send({"op": "bundle", "bundle": bundle_message, "events": events})
        return self.reply

    def drain(self, timeout: float) -> None:
        self.send({"op": "drain", "timeout": timeout})

    def stop(self) -> None:
        self.send({"op": "stop"})

    def kill(self) -> None:
        if self.alive:
            try:
                self.proc.kill()
            except OSError:
                pass

    # listening ----------------------------------------------------------------------------
    def _read(self) -> None:
        while True:
            message = self.channel.receive()
            if message is None:
                return
            self._on_message(message)

    def _on_message(self, message: dict) -> None:
        op = message.get("op")
        if op == "ready":
            self.generation = int(message.get("generation", 0))
            log.info("worker %d (pid %d) is serving generation %d", self.slot, self.pid,
                     self.generation, extra={"worker": self.slot, "pid": self.pid,
                                             "event": "worker_ready"})
            self.started.set(True)
        elif op == "active":
            self.active = {str(k): int(v) for k, v in message.get("counts", {}).items()}
        elif op == "failed":
            self.started.set_exception(WorkerStartFailed(message.get("error", "unknown")))
        elif op in ("reloaded", "reload_failed") and self.reply is not None:
            if op == "reloaded":
                self.generation = int(message["generation"])
            self.reply.set(None if op == "reloaded" else message.get("error", "unknown"))

    def _watch(self) -> None:
        self.returncode = self.proc.wait()
        self._greenlets[0].join(timeout=1.0)  # read its last words ("failed: why") first
        self.exited.set()
        if not self.started.ready():
            self.started.set_exception(WorkerStartFailed(
                f"worker {self.slot} exited ({describe_exit(self.returncode)}) before serving"))
        if self.reply is not None and not self.reply.ready():
            self.reply.set(f"the worker exited ({describe_exit(self.returncode)})")
        self.channel.close()
        self.on_exit(self)

    def uptime(self) -> float:
        return time.monotonic() - self.started_at


def describe_exit(code: int | None) -> str:
    if code is None:
        return "no process"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _worker_env() -> dict[str, str]:
    """Only the master talks to systemd (NotifyAccess=main)."""
    env = dict(os.environ)
    env.pop("NOTIFY_SOCKET", None)
    return env
