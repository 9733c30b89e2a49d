"""Every configuration setting of dynproxy, declared once, as a tree of frozen dataclasses.

Each field is declared with `setting(default, kind, help)`: the key, the YAML default,
how values are checked and one line of meaning. YAML loading, the documented example
(config/dynproxy.yaml), `Config.to_dict()` and command-line overrides all derive from
these declarations; add a setting here and nowhere else. Times are float seconds.

Must never do I/O nor import gevent, socket, ssl or redis.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from dynproxy.core.config_fields import REQUIRED, Record, section, setting, to_plain
from dynproxy.core.config_problems import MarkTable, Path, ProblemCollector
from dynproxy.core.config_values import (
    INVALID,
    Bind,
    BindAddress,
    Boolean,
    Choice,
    Duration,
    Integer,
    Kind,
    ListOf,
    Nullable,
    RedisUrl,
    ServerName,
    Text,
    TlsVersion,
)

__all__ = [
    "Bind", "CertificateEntry", "Config", "ConfigOrigin", "Health", "Monitoring",
    "PluginSpec", "Redis", "Server", "Shutdown", "Timeouts", "Tls", "UdpListener",
]

BIND = BindAddress()
DURATION = Duration()
PATH = Text("a file path")
NAME = Text("a name: a letter or '_', then letters, digits, '_' or '-'",
            r"[A-Za-z_][A-Za-z0-9_-]*", max_length=128)
MODULE = Text("a module path 'package.module:attribute'",
              r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")
ALPN_ID = Text("an ALPN protocol id like 'h2' or 'http/1.1'", max_length=255)
MANY = 10_000_000


@dataclass(frozen=True, slots=True)
class UdpListener:
    """One UDP listener; session settings left out take the server-wide ones."""

    bind: Bind = setting(REQUIRED, BIND, "address to listen on")
    session_idle: float = setting(  # type: ignore[assignment]
        None, Nullable(DURATION, " to use server.timeouts.udp_session_idle"),
        "end a session after this long without datagrams")
    max_sessions: int = setting(  # type: ignore[assignment]
        None, Nullable(Integer(1, MANY), " to use server.udp_max_sessions"),
        "most sessions at once on this listener; the longest idle is evicted")


class UdpListenerEntry(Kind):
    """A udp_bind item: "HOST:PORT", or a mapping with per-listener session settings."""

    def __init__(self) -> None:
        self.record = Record(UdpListener)
        self.expected = f"{BIND.expected}, or {self.record.expected}"

    def check(self, value: object, at: Path, report: ProblemCollector,
              expected: str | None = None) -> object:
        if isinstance(value, dict):
            return self.record.check(value, at, report)
        bind = BIND.check(value, at, report, expected or self.expected)
        return INVALID if bind is INVALID else UdpListener(bind)  # type: ignore[arg-type]

    def to_plain(self, parsed: object, *, redact: bool = False) -> object:
        return to_plain(parsed)


@dataclass(frozen=True, slots=True)
class Timeouts:
    connect: float = setting("5s", DURATION, "wait this long for a backend to accept, "
                             "then try the next member")
    idle: float = setting("300s", DURATION, "close a TCP connection after this long with "
                          "no bytes either way")
    client_hello: float = setting("5s", DURATION, "wait this long for a client's TLS "
                                  "ClientHello (the SNI peek)")
    udp_session_idle: float = setting("60s", DURATION, "end a UDP session after this long "
                                      "without datagrams (per listener: udp_bind)")


@dataclass(frozen=True, slots=True)
class Server:
    tcp_bind: tuple[Bind, ...] = setting(
        ["0.0.0.0:8080"], ListOf(BIND, accept_single=True), "TCP listeners")
    udp_bind: tuple[UdpListener, ...] = setting(
        ["0.0.0.0:8081"], ListOf(UdpListenerEntry(), accept_single=True),
        "UDP listeners; an item may be a mapping with per-listener session settings",
        example=["0.0.0.0:8081", {"bind": "[::]:5353", "session_idle": "10s",
                                  "max_sessions": 5000}])
    buffer_size: int = setting(262144, Integer(1024, 16 * 1024 * 1024),
                               "bytes moved per read or splice when relaying, and the most "
                               "one direction of a connection holds in the proxy under "
                               "backpressure (idle connections hold none)")
    max_connections: int = setting(10000, Integer(1, MANY), "most TCP connections each "
                                   "listener serves at once in one worker; beyond it new ones "
                                   "wait in the listen backlog (counted)")
    workers: int = setting(0, Integer(0, 1024), "worker processes; 0 means one per CPU")
    pid_file: str | None = setting(None, Nullable(PATH, " for none"), "where the "
                                   "master writes its pid, for `dynproxy reload|stop`")
    timeouts: Timeouts = section(Timeouts, "How long to wait before giving up")
    udp_max_sessions: int = setting(100000, Integer(1, MANY), "most UDP sessions per "
                                    "listener in one worker; the longest idle is evicted")
    backlog: int = setting(1024, Integer(1, 65535), "pending connections each TCP listener queues (listen backlog)")

    def __post_init__(self) -> None:
        # Listeners that left session settings out inherit the server-wide ones.
        inherited = tuple(replace(
            listener,
            session_idle=_or(listener.session_idle, self.timeouts.udp_session_idle),
            max_sessions=_or(listener.max_sessions, self.udp_max_sessions),
        ) for listener in self.udp_bind)
        object.__setattr__(self, "udp_bind", inherited)


def _or(value: Any, fallback: Any) -> Any:
    return fallback if value is None else value


@dataclass(frozen=True, slots=True)
class Shutdown:
    drain_timeout: float = setting("30s", Duration(allow_zero=True), "on SIGTERM/SIGINT, "
                                   "let open connections finish this long, then close them")


@dataclass(frozen=True, slots=True)
class CertificateEntry:
    cert_path: str = setting(REQUIRED, PATH, "certificate chain (PEM)")
    key_path: str = setting(REQUIRED, PATH, "its private key (PEM)")
    hostname: str | None = setting(None, Nullable(ServerName(), " for the names in the certificate"),
                                   "SNI this certificate serves")
    name: str | None = setting(None, Nullable(NAME), "what `terminate tls cert NAME` calls it")


CERTIFICATE_EXAMPLE = [
    {"hostname": "api.example.com", "cert_path": "certs/api.crt", "key_path": "certs/api.key"},
    {"hostname": "*.example.com", "cert_path": "certs/wildcard.crt",
     "key_path": "certs/wildcard.key"},
    {"name": "internal", "cert_path": "certs/internal.crt", "key_path": "certs/internal.key"},
]


@dataclass(frozen=True, slots=True)
class Tls:
    cert_path: str | None = setting(None, Nullable(PATH), "default certificate chain (PEM), "
                                    "served when no other covers the SNI")
    key_path: str | None = setting(None, Nullable(PATH), "private key of the default "
                                   "certificate (PEM)")
    sni_routing: bool = setting(True, Boolean(), "read the SNI from the ClientHello and "
                                "route by it")
    strict_sni: bool = setting(False, Boolean(), "fail the handshake when no certificate "
                               "covers the SNI, instead of serving the default")
    min_version: str = setting("1.2", TlsVersion(), "lowest TLS version accepted when "
                               "terminating")
    alpn: tuple[str, ...] = setting([], ListOf(ALPN_ID), "ALPN protocols offered when "
                                    "terminating, most preferred first",
                                    example=["h2", "http/1.1"])
    handshake_timeout: float = setting("10s", DURATION, "give up a TLS handshake after "
                                       "this long")
    allow_expired: bool = setting(False, Boolean(), "load expired certificates (with a "
                                  "warning) instead of refusing them")
    watch_interval: float = setting("5s", DURATION, "check certificate files for changes "
                                    "this often (SIGHUP reloads at once)")
    certificates: tuple[CertificateEntry, ...] = setting(
        [], ListOf(Record(CertificateEntry)), "certificates chosen by SNI: exact name, "
        "then one-label wildcard, then the default", example=CERTIFICATE_EXAMPLE)


@dataclass(frozen=True, slots=True)
class Redis:
    url: str | None = setting(None, Nullable(RedisUrl(), " to turn Redis features off"),
                              "Redis server holding backends",
                              example="redis://:secret@127.0.0.1:6379/0")
    pool_size: int = setting(10, Integer(1, 1000), "connections kept to Redis")
    timeout_ms: int = setting(500, Integer(1, 600_000), "give up a Redis command after "
                              "this many milliseconds")
    cache_ttl_secs: int = setting(30, Integer(0, 86_400), "trust a value read from Redis "
                                  "this many seconds before reading it again")
    max_retries: int = setting(3, Integer(0, 100), "retries of a failed Redis command")
    key_prefix: str = setting("proxy:", Text(), "prefix of every key dynproxy reads and "
                              "writes; a backend is PREFIX + 'backends:' + NAME")
    rescan_interval: float = setting("2s", DURATION, "rescan backend keys this often, to "
                                     "notice plain SET/DEL and expiry")
    channel: str = setting("proxy:backends:changes", Text(), "pub/sub channel that "
                           "`dynproxy backends ...` announces changes on")
    close_removed: bool = setting(False, Boolean(), "close existing connections to a "
                                  "backend removed from Redis (else they finish)")


@dataclass(frozen=True, slots=True)
class Health:
    default_interval: float = setting("2s", DURATION, "active check period, unless the "
                                      "pool says otherwise")
    default_timeout: float = setting("1s", DURATION, "active check timeout, unless the "
                                     "pool says otherwise")
    default_rise: int = setting(2, Integer(1, 100), "consecutive passed checks that mark "
                                "a member up")
    default_fall: int = setting(3, Integer(1, 100), "consecutive failed checks that mark "
                                "a member down")
    passive_fall: int = setting(3, Integer(0, 100), "consecutive failures in live traffic "
                                "(a connect refused or timed out, a UDP port unreachable) "
                                "that mark a member down in the worker that saw them, "
                                "apart from the active checks' rise/fall; a success in "
                                "live traffic resets the count; 0: traffic never marks a "
                                "member down, it only reports")


@dataclass(frozen=True, slots=True)
class Monitoring:
    metrics_bind: Bind = setting("127.0.0.1:9090", BIND, "address of /metrics, /healthz "
                                 "and /backends")
    log_level: str = setting("info", Choice("debug", "info", "warning", "error"),
                             "least severe log level written")
    enable_metrics: bool = setting(True, Boolean(), "serve /metrics (and the other "
                                   "endpoints on metrics_bind)")
    access_log: bool = setting(True, Boolean(), "log one line per connection or UDP session")
    log_format: str = setting("json", Choice("json", "text"), "format of log lines: json "
                              "(one object per line) or text (for people)")


@dataclass(frozen=True, slots=True)
class PluginSpec:
    name: str = setting(REQUIRED, NAME, "what rules call it: plugin(NAME)")
    module: str = setting(REQUIRED, MODULE, "where its object lives")


@dataclass(frozen=True, slots=True, eq=False)
class ConfigOrigin:
    """Where a Config came from: the data as read and its positions (for overrides)."""

    source: str
    raw: dict
    marks: MarkTable


@dataclass(frozen=True, slots=True)
class Config:
    server: Server = section(Server, "Listeners, limits and timeouts")
    shutdown: Shutdown = section(Shutdown, "Graceful shutdown")
    tls: Tls = section(Tls, "TLS: SNI routing, and certificates for `terminate tls` rules")
    redis: Redis = section(Redis, "Backends from Redis (rules: members from redis \"GLOB\")")
    health: Health = section(Health, "Health checks (defaults for pools that set none)")
    monitoring: Monitoring = section(Monitoring, "Metrics and logs")
    plugins: tuple[PluginSpec, ...] = setting(
        [], ListOf(Record(PluginSpec)), "routing plugins loaded by module path "
        "(entry points in group dynproxy.plugins load without this)",
        example=[{"name": "tenant_router", "module": "mycompany.routing:TenantRouter"}])
    origin: ConfigOrigin | None = field(default=None, compare=False, repr=False)

    def to_dict(self, *, redact: bool = True) -> dict[str, object]:
        """Plain data for display (secrets masked unless redact=False, which loads back)."""
        return to_plain(self, redact=redact)
