"""`dynproxy reload` and `dynproxy stop [--fast]`: signal the running master.

The master is found through its pid file (--pid-file, or server.pid_file of --config);
a pid file whose process is gone or is not dynproxy is refused rather than trusted.
No gevent here: these commands start fast and only send a signal (and, for stop, wait).
"""

from __future__ import annotations

import os
import signal
import sys
import time

import click

from dynproxy.cli.number_args import Seconds
from dynproxy.core.config import ConfigError, load_config_file
from dynproxy.proc.pidfile import PidFileError, read_pid

_PID_FILE = click.option("--pid-file", type=click.Path(dir_okay=False),
                         help="The master's pid file (default: server.pid_file of --config).")
_CONFIG = click.option("--config", "config_path", type=click.Path(dir_okay=False),
                       help="The config the proxy runs with; its server.pid_file is used.")


def _master_pid(pid_file: str | None, config_path: str | None) -> int:
    if pid_file is None and config_path is not None:
        try:
            pid_file = load_config_file(config_path).server.pid_file
        except ConfigError as exc:
            _fail(str(exc))
        if pid_file is None:
            _fail(f"{config_path} sets no server.pid_file; pass --pid-file")
    if pid_file is None:
        _fail("which dynproxy? pass --pid-file PATH, or --config FILE whose "
              "server.pid_file names it")
    try:
        return read_pid(pid_file)
    except PidFileError as exc:
        _fail(str(exc))


def _fail(message: str):
    click.echo(f"dynproxy: {message}", err=True)
    sys.exit(1)


@click.command()
@_PID_FILE
@_CONFIG
def reload(pid_file, config_path):
    """Reload rules, config and certificates (SIGHUP to the master).

    A bad rule file is reported in the proxy's log and the old rules keep serving;
    `proxy_reloads_total{result="failed"}` counts it.
    """
    pid = _master_pid(pid_file, config_path)
    os.kill(pid, signal.SIGHUP)
    click.echo(f"dynproxy: sent SIGHUP to pid {pid}: reloading (the outcome is in its log "
               f"and in proxy_reloads_total)")


@click.command()
@_PID_FILE
@_CONFIG
@click.option("--fast", is_flag=True, help="Close every connection now (SIGQUIT) instead "
              "of letting them finish (SIGTERM).")
@click.option("--wait/--no-wait", default=True, show_default=True,
              help="Wait until the proxy has exited.")
@click.option("--timeout", type=Seconds("--timeout 60", "or --no-wait"), default=None,
              help="Give up waiting after this many seconds (exit status 1).")
def stop(pid_file, config_path, fast, wait, timeout):
    """Stop the proxy: gracefully (drain up to shutdown.drain_timeout), or --fast."""
    pid = _master_pid(pid_file, config_path)
    sig = signal.SIGQUIT if fast else signal.SIGTERM
    os.kill(pid, sig)
    how = "closing every connection now" if fast else "letting open connections finish"
    click.echo(f"dynproxy: sent {sig.name} to pid {pid}: {how}")
    if not wait:
        return
    if not _wait_gone(pid, timeout):
        _fail(f"pid {pid} is still running after {timeout}s; "
              "`dynproxy stop --fast` closes every connection at once")
    click.echo("dynproxy: stopped")


def _wait_gone(pid: int, timeout: float | None) -> bool:
    deadline = None if timeout is None else time.monotonic() + timeout
    while deadline is None or time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited master its parent has not reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            state = file.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state != b"Z"
