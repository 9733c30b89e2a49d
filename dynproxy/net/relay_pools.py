"""Per-process free lists of the relay's in-flight storage: pipes (splice) and buffers
(copy); and of stopped libev io watchers, reused for the next connection's sockets.

A relay borrows one pipe or buffer per direction only while bytes are in flight and
gives it back as soon as it is empty, so idle connections hold none and a busy process
needs about as many as it has connections with bytes in flight. Both lists are bounded;
beyond the bound, returned pipes are closed and buffers dropped. When no pipe is free and
the kernel makes none (out of descriptors or pipe memory) `PipePool.take` raises and
counts it; the relay then copies instead (relay_flows.SpliceFlow).

Watchers: gevent checks every new io watcher's fd with fcntl(F_GETFD) and allocates
it; a stopped watcher can instead be pointed at another fd (`watcher.fd = fd`, no
syscall). A connection uses three or four, so reusing them saves as many syscalls and
allocations per connection.

Must never: hand out a pipe that may hold bytes (a pipe that may is discarded, never
given back), register a watcher on a pipe, hand out a watcher that is still active or
belongs to another loop, or let a forked child share its parent's pipes.
"""

from __future__ import annotations

import errno
import os
import posix
from fcntl import F_SETPIPE_SZ, fcntl

__all__ = ["BUFFERS", "NO_PIPE_ERRNOS", "PIPES", "WATCHERS", "BufferPool", "PipePool",
           "WatcherPool"]

_DEFAULT_PIPE_BYTES = 65536  # Linux's default pipe capacity: no fcntl needed up to this
# gevent's monkey-patched os.close defers every close through a check watcher (fstat,
# fcntl, an Event) in case the fd has watchers; these pipes never have any: close now.
_close_fd = posix.close
# pipe2(2) failing for lack of resources: descriptors (per process, system-wide) or the
# user's pipe memory; the connection can go on without a pipe.
NO_PIPE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOMEM})


class PipePool:
    """Bounded per-process free list of empty non-blocking pipes, shared by all relays.

    A relay takes a pipe when bytes become readable and gives it back as soon as it is
    empty again, so a process needs about as many pipes as it has connections with bytes
    in flight. A pipe that may hold bytes is discarded (closed), never given back.
    Creations the kernel refused for lack of resources are counted in `refused`, and
    `on_refused()` (the TCP path's error counter) is called for each.
    """

    __slots__ = ("limit", "created", "lent", "refused", "on_refused", "_free")

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit
        self.created = 0  # pipes ever created: tests and metrics see the reuse
        self.lent = 0  # pipes currently held by relays
        self.refused = 0  # creations refused with one of NO_PIPE_ERRNOS
        self.on_refused = None
        self._free: list[tuple[int, int]] = []

    def __len__(self) -> int:
        return len(self._free)

    def take(self, size: int) -> tuple[int, int]:
        """An empty pipe (read_fd, write_fd), reused when one is free; OSError (nothing
        lent) when none is free and the kernel makes none."""
        pipe = self._free.pop() if self._free else self._create(size)
        self.lent += 1
        return pipe

    def give(self, pipe: tuple[int, int]) -> None:
        """Return an EMPTY pipe; beyond `limit` free pipes it is closed instead."""
        self.lent -= 1
        if len(self._free) < self.limit:
            self._free.append(pipe)
        else:
            _close_pipe(pipe)

    def discard(self, pipe: tuple[int, int]) -> None:
        """Close a pipe that may still hold bytes."""
        self.lent -= 1
        _close_pipe(pipe)

    def close_idle(self) -> None:
        """Close every free pipe (shutdown, tests, and a forked child's inherited ones)."""
        free, self._free = self._free, []
        for pipe in free:
            _close_pipe(pipe)

    def _create(self, size: int) -> tuple[int, int]:
        try:
            pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in NO_PIPE_ERRNOS:
                self.refused += 1
                if self.on_refused is not None:
                    self.on_refused()
            raise
        self.created += 1
        if size > _DEFAULT_PIPE_BYTES:
            try:
                fcntl(pipe[1], F_SETPIPE_SZ, size)
            except OSError:  # above fs.pipe-max-size: the default size works, in smaller steps
                pass
        return pipe


class BufferPool:
    """Bounded per-process free lists of copy buffers (memoryviews), one list per size.

    Used only by the copy path; a buffer is held while its bytes are in flight. A
    process uses one or two sizes (the configured buffer_size), so the lists stay few.
    """

    __slots__ = ("limit", "lent", "_free")

    def __init__(self, limit: int = 64) -> None:
        self.limit = limit  # free buffers kept per size
        self.lent = 0  # buffers currently held by relays
        self._free: dict[int, list[memoryview]] = {}

    def __len__(self) -> int:
        return sum(map(len, self._free.values()))

    def take(self, size: int) -> memoryview:
        self.lent += 1
        free = self._free.get(size)
        return free.pop() if free else memoryview(bytearray(size))

    def give(self, view: memoryview) -> None:
        self.lent -= 1
        free = self._free.setdefault(len(view), [])
        if len(free) < self.limit:
            free.append(view)


class WatcherPool:
    """Bounded per-process free lists of stopped io watchers, one list per event mask."""

    __slots__ = ("limit", "_loop", "_free")

    def __init__(self, limit: int = 512) -> None:
        self.limit = limit  # free watchers kept per event mask
        self._loop = None
        self._free: dict[int, list] = {1: [], 2: []}

    def __len__(self) -> int:
        return sum(map(len, self._free.values()))

    def take(self, loop, fd: int, events: int):
        """A stopped io watcher of `loop` for `fd` and `events` (1 read, 2 write)."""
        if loop is not self._loop:  # a new hub (tests make some): forget the old loop's
            self._loop = loop
            self._free = {1: [], 2: []}
        free = self._free[events]
        if free:
            watcher = free.pop()
            watcher.fd = fd
            return watcher
        return loop.io(fd, events)

    def give(self, watcher) -> None:
        """Stop `watcher` and keep it for reuse (beyond `limit`, close it)."""
        watcher.stop()
        free = self._free.get(watcher.events & 3) if watcher.loop is self._loop else None
        if free is not None and len(free) < self.limit:
            free.append(watcher)
        else:
            watcher.close()


PIPES = PipePool()
BUFFERS = BufferPool()
WATCHERS = WatcherPool()
# A forked child must never share a pipe with its parent: two processes splicing through
# one pipe would interleave their connections' bytes.
os.register_at_fork(after_in_child=PIPES.close_idle)


def _close_pipe(pipe: tuple[int, int]) -> None:
    _close_fd(pipe[0])
    _close_fd(pipe[1])

