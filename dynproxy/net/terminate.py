"""One TLS-terminated connection: handshake with the certificate the SNI selects, then
dial the backend and relay the plaintext (re-encrypted when the backend has `tls`).

Called by net/tcp.py for a decision with `terminate` when the snapshot has a
CertStore. The ClientHello bytes the proxy already read to route are fed to OpenSSL
first (TlsStream). The handshake has its own deadline (`tls.handshake_timeout`); a
failed one is counted by reason in proxy_tls_handshakes_total, logged at most once per
10 s per reason, closes that connection only, and never reaches a backend.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time

from dynproxy.net.dial import DialFailed, dial
from dynproxy.net.tcp import proxy_header
from dynproxy.net.tls_stream import TlsStream, relay_streams
from dynproxy.obs.log import log_once_per

__all__ = ["HANDSHAKE_FAILURES", "handshake_failure", "serve_terminated"]

log = logging.getLogger("dynproxy.tls")

# OpenSSL's reason codes, grouped into the bounded `reason` label.
_BY_OPENSSL_REASON = {
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_SHARED_GROUPS": "no_shared_cipher",
    "NO_SUITABLE_SIGNATURE_ALGORITHM": "no_shared_cipher",
    "NO_SHARED_SIGNATURE_ALGORITHMS": "no_shared_cipher",
    "UNSUPPORTED_PROTOCOL": "wrong_version",
    "VERSION_TOO_LOW": "wrong_version",
    "TLSV1_ALERT_PROTOCOL_VERSION": "wrong_version",
    "TLSV1_ALERT_UNRECOGNIZED_NAME": "unknown_sni",
    "CALLBACK_FAILED": "unknown_sni",
    "UNEXPECTED_EOF_WHILE_READING": "eof",
}
HANDSHAKE_FAILURES = ("no_shared_cipher", "wrong_version", "garbage", "unknown_sni",
                      "client_alert", "eof", "timeout", "reset", "other")
_LOG_INTERVAL = 10.0


def serve_terminated(proxy, snap, client, addr, conn, decision, initial: bytes, stats) -> None:
    """Terminate TLS on `client`, then forward the plaintext as `decision` says."""
    store, metrics = snap.tls, proxy.metrics
    store.bind_metrics(metrics)
    server = snap.config.server
    # Handshake flights and records are written whole: Nagle would only hold the last
    # small one back until the client's delayed ACK (40 ms).
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    stream = TlsStream(client, store.context(decision.terminate), server_side=True,
                       initial=initial, read_size=server.buffer_size)
    try:
        stream.handshake(time.monotonic() + snap.config.tls.handshake_timeout,
                         defer_tickets=True)
    except OSError as exc:
        _handshake_failed(metrics, addr, stats, exc)
        return
    metrics.tls_handshakes_total.labels("ok", stream.version or "unknown").inc()
    try:
        member, upstream = dial(snap, decision, conn, metrics)
    except DialFailed as failed:
        stats.end, stats.backend = failed.end, failed.backend
        return
    stats.backend = member.id
    try:
        header = proxy_header(member.spec.send_proxy, client, addr)
        stats.header = len(header)
        result = relay_streams(stream, upstream, initial_up=header,
                               idle_timeout=server.timeouts.idle,
                               buffer_size=server.buffer_size,
                               watch=proxy.watch_stream(stats))
        stats.up, stats.down, stats.end = (result.bytes_up - len(header), result.bytes_down,
                                           result.end)
        if result.end == "reset":
            metrics.errors_total.labels("reset").inc()
    finally:
        member.active -= 1
        upstream.close()


def handshake_failure(exc: OSError) -> str:
    """The bounded reason a handshake failed, from what OpenSSL or the socket said."""
    if isinstance(exc, ssl.SSLError):
        reason = getattr(exc, "reason", None) or ""
        known = _BY_OPENSSL_REASON.get(reason)
        if known is not None:
            return known
        if isinstance(exc, ssl.SSLEOFError):
            return "eof"
        if reason.startswith(("TLSV1_ALERT_", "SSLV3_ALERT_", "TLSV13_ALERT_")):
            return "client_alert"
        return "garbage" if reason else "other"
    if isinstance(exc, TimeoutError):
        return "timeout"
    return "reset"


def _handshake_failed(metrics, addr, stats, exc: OSError) -> None:
    reason = handshake_failure(exc)
    metrics.tls_handshakes_total.labels("failed", reason).inc()
    stats.end = "tls_failed"
    log_once_per(f"tls-handshake-{reason}", _LOG_INTERVAL,
                 "TLS handshake from %s failed (%s): %s", addr[0], reason, _detail(exc),
                 level=logging.INFO, logger=log, reason=reason)


def _detail(exc: OSError) -> str:
    if isinstance(exc, ssl.SSLError):
        return exc.reason or exc.__class__.__name__
    return exc.strerror or str(exc) or exc.__class__.__name__
