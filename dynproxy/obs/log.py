"""Structured logging: JSON lines (or text) on stderr, the access log, and flood control.

`setup_logging` installs one handler on the root logger (so gevent's and redis' records
come out in the same format). Extra fields given with `extra=` become JSON keys.

`access_log` writes exactly one JSON line per connection or UDP session to the
`dynproxy.access` logger, whatever the format of the other lines and whatever the
general log level (it is switched off only by `setup_logging(access=False)`).
Every JSON line, access or not, carries its time under the same key, `time` (the
access line's field name in the issue that specified it).
`ACCESS_LINES` is the TCP hot path's way to the same lines: `tcp_line` formats one with
an f-string (the constant parts JSON-encoded once, by the caller) and queues it, and
`flush` writes the queue with one write, once per event-loop iteration.

`OnceLogger` keeps logs readable under failure: `transition` logs only when a key's
state changes (Redis up/down: one line per transition, never one per attempt);
`once_per` logs the first event of a kind, then at most one line per interval carrying
the count of events suppressed meanwhile (a flood of malformed ClientHellos).

Never put secrets (Redis passwords, keys) in log fields; never log per packet.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import IO, Any, Callable

__all__ = [
    "ACCESS_LINES",
    "ACCESS_LOGGER",
    "END_REASONS",
    "AccessLines",
    "OnceLogger",
    "access_log",
    "format_ts",
    "json_text",
    "log_once_per",
    "log_transition",
    "set_access_fields",
    "setup_logging",
]

ACCESS_LOGGER = "dynproxy.access"
END_REASONS = frozenset({"closed", "reset", "timeout", "rejected", "no_backend",
                         "connect_failed", "error", "tls_failed", "evicted", "shutdown",
                         "fd_limit"})
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
          "warn": logging.WARNING, "error": logging.ERROR, "critical": logging.CRITICAL}
FORMATS = ("json", "text")

_encode = json.JSONEncoder(default=str).encode
_access = logging.getLogger(ACCESS_LOGGER)
_access_fields: dict[str, Any] = {}  # added to every access line (e.g. worker=1)
_access_suffix = [""]  # the same fields as JSON text: `, "worker": 1`
# Attributes every LogRecord has; anything else on a record came from `extra=`.
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message", "asctime", "taskName"}


class _SecondCache:
    """Formats the date and time part once per second, not once per line."""

    __slots__ = ("pair",)

    def __init__(self) -> None:
        self.pair = (-1, "")

    def format(self, t: float) -> str:
        sec = int(t)
        return f"{self.prefix(sec)}.{int((t - sec) * 1000):03d}Z"

    def prefix(self, sec: int) -> str:
        """`2024-05-01T12:00:00` for the whole second `sec`."""
        cached_sec, prefix = self.pair
        if sec != cached_sec:
            prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
            self.pair = (sec, prefix)
        return prefix


_clock_text = _SecondCache()


def format_ts(t: float) -> str:
    """ISO 8601 UTC with milliseconds: 2024-05-01T12:00:00.123Z."""
    return _clock_text.format(t)


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg, then any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == ACCESS_LOGGER:
            return record.getMessage()  # already one JSON line
        out = {"time": format_ts(record.created), "level": record.levelname.lower(),
               "logger": record.name, "msg": record.getMessage()}
        out.update(_extra_fields(record))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return _encode(out)


class TextFormatter(logging.Formatter):
    """`time LEVEL logger: msg key=value ...` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        if record.name == ACCESS_LOGGER:
            return record.getMessage()
        fields = " ".join(f"{k}={_text_value(v)}" for k, v in _extra_fields(record).items())
        line = (f"{format_ts(record.created)} {record.levelname} {record.name}: "
                f"{record.getMessage()}" + (f" {fields}" if fields else ""))
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def _text_value(value: Any) -> str:
    text = str(value)
    return text if text and " " not in text and "=" not in text else _encode(text)


class _OurHandler(logging.StreamHandler):
    """Marks the handler setup_logging installed, so a second call replaces it."""


class _Installed:
    __slots__ = ("handler",)

    def __init__(self) -> None:
        self.handler: _OurHandler | None = None


_installed = _Installed()


def setup_logging(level: str | int = "info", fmt: str = "json", *,
                  stream: IO[str] | None = None, access: bool = True) -> logging.Handler:
    """Send all logs to `stream` (stderr) as JSON lines or text; returns the handler."""
    numeric = _parse_level(level)
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r}; expected one of {FORMATS!r}")
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
    handler = _OurHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    root.setLevel(numeric)
    _installed.handler = handler
    # The access log is its own stream of facts: the general level does not silence it.
    _access.setLevel(logging.INFO if access else logging.CRITICAL + 1)
    return handler


def _parse_level(level: str | int) -> int:
    if isinstance(level, int):
        return level
    numeric = LEVELS.get(str(level).lower())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; expected one of "
                         f"{sorted(set(LEVELS) - {'warn'})!r}")
    return numeric


def access_log(*, client: str, listener: str, proto: str, sni: str | None,
               rule: str | None, backend: str | None, bytes_up: int, bytes_down: int,
               duration_ms: float, end: str, time_s: float | None = None,
               **extra: Any) -> None:
    """Write one access-log line (one per TCP connection or UDP session, at its end).

    `rule` is "file:line" of the deciding rule; `end` is one of END_REASONS; `time_s`
    (epoch seconds, default now) is when the connection started or ended, as the
    caller prefers: say which in the docs of the caller.
    """
    if not _access.isEnabledFor(logging.INFO):
        return
    if end not in END_REASONS:
        raise ValueError(f"access_log end={end!r}; expected one of {sorted(END_REASONS)!r}")
    line = {"time": format_ts(time.time() if time_s is None else time_s),
            "logger": ACCESS_LOGGER, "client": client, "listener": listener,
            "proto": proto, "sni": sni, "rule": rule, "backend": backend,
            "bytes_up": bytes_up, "bytes_down": bytes_down,
            "duration_ms": round(duration_ms, 3), "end": end}
    if _access_fields:
        line.update(_access_fields)
    if extra:
        line.update(extra)
    _emit_access(_encode(line))


def set_access_fields(**fields: Any) -> None:
    """Fields every later access-log line of this process carries (a worker's number)."""
    _access_fields.clear()
    _access_fields.update(fields)
    _access_suffix[0] = "".join(f", {_encode(k)}: {_encode(v)}" for k, v in fields.items())


def json_text(value: Any) -> str:
    """`value` as JSON text, as the access log writes it (precompute it for constants)."""
    return _encode(value)


class AccessLines:
    """TCP access-log lines, formatted cheaply and written in batches.

    The line is the one `access_log` writes, key for key. `tcp_line` queues it;
    `flush` (a hook of the metrics batch: once per event-loop iteration, after the
    metrics are pushed) writes every queued line with one write when our handler is
    the only destination, else hands each to logging like `access_log` does.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending: list[str] = []

    @staticmethod
    def enabled() -> bool:
        return _access.isEnabledFor(logging.INFO)

    def tcp_line(self, wall: float, client: str, listener_json: str, sni: str | None,
                 rule_json: str, backend_json: str, bytes_up: int, bytes_down: int,
                 duration: float, end: str) -> None:
        """Queue one line. `*_json` are JSON texts (json_text); `client` is host:port and
        `sni` a ClientHello name (neither needs escaping); `duration` is in seconds
        (written in ms, 3 decimals, with integer arithmetic); `end` one of END_REASONS."""
        sni_json = "null" if sni is None else f'"{sni}"'
        micros = int(duration * 1_000_000 + 0.5)
        second = int(wall)
        cached, prefix = _clock_text.pair  # format_ts inlined: one call fewer per line
        if second != cached:
            prefix = _clock_text.prefix(second)
        self._pending.append(
            f'{{"time": "{prefix}.{int((wall - second) * 1000):03d}Z", '
            f'"logger": "{ACCESS_LOGGER}", '
            f'"client": "{client}", "listener": {listener_json}, "proto": "tcp", '
            f'"sni": {sni_json}, "rule": {rule_json}, "backend": {backend_json}, '
            f'"bytes_up": {bytes_up}, "bytes_down": {bytes_down}, '
            f'"duration_ms": {micros // 1000}.{micros % 1000:03d}, "end": "{end}"'
            f'{_access_suffix[0]}}}')

    def flush(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        ours = _installed.handler
        if _only_destination(ours):
            with ours.lock:
                ours.stream.write("\n".join(pending) + "\n")
                ours.stream.flush()
            return
        for line in pending:
            _emit_access(line)


ACCESS_LINES = AccessLines()


def _only_destination(ours: logging.Handler | None) -> bool:
    """True when our handler is the only one an access line would reach."""
    root_handlers = logging.root.handlers
    return (ours is not None and len(root_handlers) == 1 and root_handlers[0] is ours
            and not _access.handlers)


def _emit_access(line: str) -> None:
    """Write straight to our handler's stream when it is the only destination (the
    production case: a third of the cost of a LogRecord); otherwise go through logging
    so that any other handler (a test's caplog, an operator's file) sees the line."""
    ours = _installed.handler
    if _only_destination(ours):
        with ours.lock:
            ours.stream.write(line + "\n")
            ours.stream.flush()
        return
    # makeRecord + handle skips logging's stack walk for the caller's file and line.
    _access.handle(_access.makeRecord(ACCESS_LOGGER, logging.INFO, "", 0, line, (), None))


class OnceLogger:
    """Logs state transitions once and rate-limits floods, per key.

    Keys must come from a bounded set chosen in code ("redis", "clienthello.malformed"),
    never from traffic; past `max_keys` the memory is cleared rather than grown.
    """

    def __init__(self, logger: logging.Logger | str = "dynproxy", *,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 4096) -> None:
        self.logger = logging.getLogger(logger) if isinstance(logger, str) else logger
        self._clock = clock
        self._max_keys = max_keys
        self._states: dict[Any, Any] = {}
        self._floods: dict[Any, list] = {}  # key -> [last emit time, suppressed count]

    def transition(self, key: Any, state: Any, msg: str, *args: Any,
                   level: int = logging.INFO, logger: logging.Logger | None = None,
                   **fields: Any) -> bool:
        """Log `msg` only if `key` was not already in `state`; True when logged."""
        if key in self._states and self._states[key] == state:
            return False
        self._remember(self._states, key, state)
        fields.setdefault("state", state)
        (logger or self.logger).log(level, msg, *args, extra=fields)
        return True

    def once_per(self, key: Any, interval_s: float, msg: str, *args: Any,
                 level: int = logging.WARNING, logger: logging.Logger | None = None,
                 **fields: Any) -> bool:
        """Log the first event for `key`, then at most one per `interval_s` carrying
        `suppressed` = events not logged since the previous line; True when logged."""
        now = self._clock()
        flood = self._floods.get(key)
        if flood is not None and now - flood[0] < interval_s:
            flood[1] += 1
            return False
        if flood is not None and flood[1]:
            fields["suppressed"] = flood[1]
        self._remember(self._floods, key, [now, 0])
        (logger or self.logger).log(level, msg, *args, extra=fields)
        return True

    def forget(self, key: Any) -> None:
        self._states.pop(key, None)
        self._floods.pop(key, None)

    def _remember(self, table: dict, key: Any, value: Any) -> None:
        if key not in table and len(table) >= self._max_keys:
            table.clear()
        table[key] = value


_default = OnceLogger("dynproxy")


def log_transition(key: Any, state: Any, msg: str, *args: Any, **kw: Any) -> bool:
    """`OnceLogger.transition` on the process-wide instance."""
    return _default.transition(key, state, msg, *args, **kw)


def log_once_per(key: Any, interval_s: float, msg: str, *args: Any, **kw: Any) -> bool:
    """`OnceLogger.once_per` on the process-wide instance."""
    return _default.once_per(key, interval_s, msg, *args, **kw)
