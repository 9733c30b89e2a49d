"""Real redis-server processes for the Redis tests, on free ports (never 6379).

`redis_server` is one server for the whole session (tests keep apart by using their
own key prefix, `prefix`); `redis_factory` starts servers a test may kill and restart.
Every server is stopped by its PID. Monkey-patching comes first: the watcher, probes
and writers under test are gevent code and must not block the hub.
"""

from gevent import monkey

monkey.patch_all()

import dataclasses  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402

import pytest  # noqa: E402
import redis  # noqa: E402

from dynproxy.core.config import load_config  # noqa: E402

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One redis-server child process; `stop()` kills it, `start()` starts it again on
    the same port (empty: nothing is saved)."""

    def __init__(self, port: int | None = None, data_dir: str | None = None):
        self.port = port or free_port()
        assert self.port != 6379, "never the default Redis port"
        self.proc: subprocess.Popen | None = None
        self.start(data_dir)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, data_dir: str | None = None) -> None:
        """Start (again); with `data_dir`, load the dump.rdb found there (see save_rdb)."""
        loads = ["--dir", str(data_dir), "--dbfilename", "dump.rdb"] if data_dir else []
        self.proc = subprocess.Popen(
            [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", *loads],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if self.client().ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.02)
        raise AssertionError(f"redis-server did not start on port {self.port}")

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.proc = None


def _save_rdb(data_dir, values: dict) -> None:
    """Write `values` into data_dir/dump.rdb with a throwaway redis-server, so that a
    restarted server comes back with exactly that data at once (as a persistent one does)."""
    scratch = RedisServer(data_dir=str(data_dir))
    try:
        client = scratch.client()
        client.mset(values)
        client.save()
    finally:
        scratch.stop()


@pytest.fixture
def save_rdb():
    return _save_rdb


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def redis_factory():
    started: list[RedisServer] = []

    def make(port: int | None = None) -> RedisServer:
        server = RedisServer(port)
        started.append(server)
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own, so tests sharing a server never meet."""
    return f"t{uuid.uuid4().hex[:10]}:"


def _redis_settings(url: str, prefix: str, **changes):
    return dataclasses.replace(load_config(None).redis, url=url, key_prefix=prefix,
                               channel=f"{prefix}changes", **changes)


def _wait_for(predicate, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


@pytest.fixture
def redis_settings():
    """`redis_settings(url, prefix, **changes)`: the config's redis section for them."""
    return _redis_settings


@pytest.fixture
def wait_for():
    """`wait_for(predicate, timeout)`: poll until true (returns the value) or until
    `timeout` passes (returns the last false value for the caller's assert to show)."""
    return _wait_for
