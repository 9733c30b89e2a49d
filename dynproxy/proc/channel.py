"""The master <-> worker channel: JSON objects, one per line, over a Unix socketpair.

Master to worker: {"op": "bundle", ...} (serve or reload this), {"op": "event", ...}
(a health or Redis change from the master's jobs), {"op": "drain"}, {"op": "stop"}.
Worker to master: {"op": "ready"}, {"op": "failed", "error"}, {"op": "reloaded"},
{"op": "reload_failed", "error"}.

`send` never blocks its caller (a slow worker must not stall the master's health
checks): messages queue and one writer greenlet writes them in order. gevent only.
"""

from __future__ import annotations

import json
import logging
import socket

import gevent
from gevent.queue import JoinableQueue

log = logging.getLogger("dynproxy.channel")

__all__ = ["Channel"]

_encode = json.JSONEncoder(ensure_ascii=True, default=str).encode


class Channel:
    """One end of the socketpair; `name` says whose end in errors."""

    def __init__(self, sock: socket.socket, name: str) -> None:
        self.sock = sock
        self.name = name
        self.closed = False
        self._out: JoinableQueue = JoinableQueue()
        self._reader = sock.makefile("rb")
        self._writer = gevent.spawn(self._write_loop)

    def send(self, message: dict) -> None:
        if not self.closed:
            self._out.put((_encode(message) + "\n").encode("ascii"))

    def receive(self) -> dict | None:
        """The next message, or None when the other end has gone (EOF or error)."""
        try:
            line = self._reader.readline()
        except OSError:
            return None
        if not line:
            return None
        try:
            return json.loads(line)
        except ValueError:
            log.error("%s: unreadable message %r", self.name, line[:200])
            return {"op": "garbled"}

    def flush(self, timeout: float) -> bool:
        """Wait until everything queued is written (before a worker exits)."""
        return self._out.join(timeout)

    def close(self) -> None:
        self.closed = True
        self._writer.kill(block=False)
        try:
            self._reader.close()
            self.sock.close()
        except OSError:
            pass

    def _write_loop(self) -> None:
        while True:
            data = self._out.get()
            try:
                if not self.closed:
                    self.sock.sendall(data)
            except OSError as exc:
                if not self.closed:
                    log.debug("%s: peer gone (%s); dropping what is queued", self.name, exc)
                self.closed = True
            finally:
                self._out.task_done()
