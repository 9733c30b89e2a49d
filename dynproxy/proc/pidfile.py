"""The master's pid file: written at start, removed at exit, read by `dynproxy reload|stop`.

A pid file is only a hint: before trusting one, check that the pid is alive and is a
dynproxy (its command line says so), so a stale file never makes us signal a stranger.
Plain files and /proc only; no gevent.
"""

from __future__ import annotations

import os

__all__ = ["PidFileError", "is_dynproxy", "read_pid", "remove_pid_file", "write_pid_file"]


class PidFileError(Exception):
    """The pid file cannot be used: says which file, what is wrong, what to do."""


def read_pid(path: str) -> int:
    """The pid in `path` of a running dynproxy, or PidFileError saying why not."""
    try:
        with open(path, encoding="ascii") as file:
            text = file.read(64).strip()
    except FileNotFoundError:
        raise PidFileError(f"no pid file at {path!r}: is dynproxy running with "
                           f"server.pid_file (or --pid-file) set to it?") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PidFileError(f"cannot read pid file {path!r}: {exc}") from None
    if not text.isdigit() or int(text) <= 0:
        raise PidFileError(f"pid file {path!r} holds {text!r}, not a process id")
    pid = int(text)
    if not _alive(pid):
        raise PidFileError(f"pid {pid} from {path!r} is not running (a stale pid file: "
                           f"dynproxy was stopped without cleaning up); remove it")
    if not is_dynproxy(pid):
        raise PidFileError(f"pid {pid} from {path!r} is {_cmdline(pid)!r}, not dynproxy; "
                           f"refusing to signal it (a stale pid file?)")
    return pid


def write_pid_file(path: str) -> None:
    """Write our pid atomically; refuse when another live dynproxy owns the file."""
    try:
        other = read_pid(path)
    except PidFileError:
        other = None  # missing, stale or foreign: ours to overwrite
    if other is not None and other != os.getpid():
        raise PidFileError(f"dynproxy is already running as pid {other} (pid file "
                           f"{path!r}); stop it with `dynproxy stop --pid-file {path}` "
                           f"or choose another server.pid_file")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as file:
            file.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as exc:
        raise PidFileError(f"cannot write pid file {path!r}: {exc.strerror or exc}; "
                           f"check server.pid_file and the directory's permissions") from None


def remove_pid_file(path: str) -> None:
    """Remove the file if it still names us (a successor may have taken it over)."""
    try:
        with open(path, encoding="ascii") as file:
            if file.read(64).strip() != str(os.getpid()):
                return
        os.unlink(path)
    except OSError:
        pass


def is_dynproxy(pid: int) -> bool:
    return "dynproxy" in _cmdline(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, but someone else's
    return True


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return file.read(4096).replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"
