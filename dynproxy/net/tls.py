"""The certificate store of TLS termination: which certificate serves which SNI, and the
SSL contexts that serve them.

Built from the `tls:` section (`CertStore.load`), checked in full before anything
serves with it (tls_certs.py reads and checks the files), and immutable after: a reload
builds a new store (`reloaded()`) and swaps the snapshot, so a bad replacement leaves
the old one serving and connections already open keep the context they started with.

Selection by SNI: an exact name, then a one-label wildcard (`*.example.com` serves
`a.example.com`, not `a.b.example.com` nor `example.com`), then the default certificate
(`tls.cert_path`, else the first `tls.certificates` entry). No SNI gets the default; an
unknown name gets the default, or with `strict_sni` a failed handshake. Entries with a
`hostname` serve that name only; entries without one serve the names in the
certificate; the default certificate's own names come last.

One SSLContext per certificate (and per ALPN list a rule asks for), plus an entry
context for the default certificate whose `sni_callback` switches
`ssl_object.context` to the chosen one: Python's way of SNI on the server side.
Never does I/O per connection; never blocks.
"""

from __future__ import annotations

import _ssl
import logging
import os
import ssl
import tempfile

from dynproxy.core.config_problems import ConfigError, ConfigProblem, dotted, short_repr
from dynproxy.net.tls_certs import CertProblem, FileStamp, LoadedCert, cert_sources, load_pair

__all__ = ["CertStore", "FALLBACK_REASONS", "cert_store_for", "server_context"]

log = logging.getLogger("dynproxy.tls")

TLS_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}
# TLS 1.2 suites: forward secret AEAD only (Mozilla "intermediate"); TLS 1.3 suites are
# OpenSSL's defaults, all modern.
CIPHERS_TLS12 = ":".join([
    "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-RSA-AES128-GCM-SHA256",
    "ECDHE-ECDSA-AES256-GCM-SHA384", "ECDHE-RSA-AES256-GCM-SHA384",
    "ECDHE-ECDSA-CHACHA20-POLY1305", "ECDHE-RSA-CHACHA20-POLY1305",
])
# The C-level property: gevent's SSLContext wraps sni_callback to hand its own SSLSocket
# to the callback, which breaks for SSLObject (memory BIOs), all this module uses.
_RAW_SNI_CALLBACK = _ssl._SSLContext.sni_callback
FALLBACK_REASONS = ("no_sni", "unknown_name", "strict_refused")
_EXPECTED = {
    "cert_path": "a readable PEM certificate chain, leaf first, valid now",
    "key_path": "the unencrypted PEM private key of that certificate",
    "hostname": "a name the certificate covers",
    "certificates": "a certificate of that name",
}


def cert_store_for(cfg, rules) -> CertStore | None:
    """The store a snapshot serves with (None when `tls:` names no certificate).

    ConfigError when a certificate is unusable, when a rule names a certificate that
    does not exist, or when rules terminate TLS and no certificate is configured (the
    connection would otherwise go through still encrypted).
    """
    settings = cfg.tls
    terminates = {d.terminate: d.rule for d in rules.decisions if d.terminate is not None}
    if not (settings.cert_path or settings.certificates):
        if terminates:
            raise _no_certificate(next(iter(terminates.values())), cfg.origin)
        return None
    store = CertStore.load(settings, cfg.origin)
    store.prepare(terminates)
    return store  # its `warnings` are logged once, by the master (proc.master/reload)


class CertStore:
    """Certificates chosen by SNI or by name, and their SSL contexts.

    `certs[0]` is the default certificate. Apart from ALPN variants built on first use
    and the metric children bound once, nothing changes after construction.
    """

    def __init__(self, settings, certs: tuple[LoadedCert, ...], origin=None):
        self.settings = settings  # the config's Tls section
        self.origin = origin  # ConfigOrigin, for error positions on reload
        self.certs = certs
        self.stamps = tuple(s for c in certs for s in c.stamps)
        self.strict = settings.strict_sni
        self.exact, self.wildcard = _index(certs)
        self.by_name = {c.source.name: i for i, c in enumerate(certs) if c.source.name}
        self._variants: dict[tuple[str, ...], _Variant] = {}
        self._chosen: dict[tuple, ssl.SSLContext] = {}
        self._fallback: dict[str, object] | None = None
        self._variant(tuple(settings.alpn))  # OpenSSL's objections surface at load

    # building ---------------------------------------------------------------------------
    @classmethod
    def load(cls, settings, origin=None, *, now=None) -> CertStore:
        """Read and check every configured certificate; ConfigError lists all problems."""
        certs = tuple(load_pair(s, allow_expired=settings.allow_expired, now=now)
                      for s in cert_sources(settings))
        if not certs:
            raise ValueError("CertStore.load: tls: configures no certificate")
        problems = [(c.source.where, p) for c in certs for p in c.problems if p.fatal]
        if problems:
            raise _config_error(problems, origin)
        try:
            return cls(settings, certs, origin)
        except _Refused as refused:
            raise _config_error([(refused.cert.source.where, refused.problem)],
                                origin) from None

    def reloaded(self) -> CertStore:
        """A new store from the same settings, files read again; raises ConfigError
        (keep serving with this one) when a file is now bad."""
        return CertStore.load(self.settings, self.origin)

    def disk_stamps(self) -> tuple:
        """The files' stamps now (None for a file that is gone)."""
        return tuple(FileStamp.of(p) for c in self.certs
                     for p in (c.source.cert_path, c.source.key_path))

    def changed(self) -> bool:
        """Has any certificate or key file been replaced or rewritten since loading?"""
        return self.disk_stamps() != self.stamps

    def prepare(self, terminates) -> None:
        """Build the contexts the rules' `terminate` actions will ask for, now, so that
        an unknown certificate name fails the load instead of a connection."""
        for spec in terminates:
            if spec.cert is not None and spec.cert not in self.by_name:
                known = sorted(self.by_name) or "none"
                raise _config_error([(("tls",), CertProblem(
                    "certificates", spec.cert, "a rule says `terminate tls cert "
                    f"{spec.cert}` but no certificate has that name (named: {known})",
                    f"add `name: {spec.cert}` to one of tls.certificates"))], self.origin)
            self.context(spec)

    # serving ----------------------------------------------------------------------------
    def context(self, terminate) -> ssl.SSLContext:
        """The context to wrap a connection with, for a rule's TerminateSpec."""
        key = (terminate.cert, terminate.alpn)
        ctx = self._chosen.get(key)
        if ctx is None:
            variant = self._variant(terminate.alpn or tuple(self.settings.alpn))
            ctx = (variant.entry if terminate.cert is None
                   else variant.contexts[self.by_name[terminate.cert]])
            self._chosen[key] = ctx
        return ctx

    def select(self, server_name: str | None) -> tuple[int, str | None]:
        """(index into certs, fallback reason or None) for a client's SNI."""
        if server_name is None:
            return 0, "no_sni"
        name = server_name.lower().rstrip(".")
        index = self.exact.get(name)
        if index is None:
            dot = name.find(".")
            if dot > 0:
                index = self.wildcard.get(name[dot + 1:])
            if index is None:
                return 0, "strict_refused" if self.strict else "unknown_name"
        return index, None

    def bind_metrics(self, metrics) -> None:
        """Count SNI fallbacks in `metrics` from now on (idempotent)."""
        if self._fallback is None:
            family = metrics.tls_sni_fallback_total
            self._fallback = {r: family.labels(r) for r in FALLBACK_REASONS}

    def count_fallback(self, reason: str) -> None:
        if self._fallback is not None:
            self._fallback[reason].inc()

    @property
    def warnings(self) -> list[str]:
        return [f"{dotted((*c.source.where, p.field))}: {p}" for c in self.certs
                for p in c.warnings]

    def _variant(self, alpn: tuple[str, ...]) -> _Variant:
        variant = self._variants.get(alpn)
        if variant is None:
            variant = self._variants[alpn] = _Variant(self, alpn)
        return variant


class _Variant:
    """The contexts of every certificate for one ALPN list, and the SNI switch."""

    __slots__ = ("store", "contexts", "entry")

    def __init__(self, store: CertStore, alpn: tuple[str, ...]):
        self.store = store
        self.contexts = tuple(server_context(store.settings, c, alpn) for c in store.certs)
        self.entry = server_context(store.settings, store.certs[0], alpn)
        _RAW_SNI_CALLBACK.__set__(self.entry, self._on_sni)

    def _on_sni(self, ssl_object, server_name, _context):
        store = self.store
        index, reason = store.select(server_name)
        if reason is not None:
            store.count_fallback(reason)
            if reason == "strict_refused":
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        if index:
            ssl_object.context = self.contexts[index]
        return None


class _Refused(Exception):
    """OpenSSL refused a certificate the checks let through (weak key, bad signature)."""

    def __init__(self, cert: LoadedCert, problem: CertProblem):
        super().__init__(str(problem))
        self.cert, self.problem = cert, problem


def server_context(settings, cert: LoadedCert, alpn: tuple[str, ...]) -> ssl.SSLContext:
    """A server context for one certificate: TLS 1.2+ (settings.min_version), forward
    secret AEAD suites in the server's order of preference, no renegotiation."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = TLS_VERSIONS[settings.min_version]
    ctx.options |= (ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION
                    | ssl.OP_NO_RENEGOTIATION)
    ctx.set_ciphers(CIPHERS_TLS12)
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    try:
        _load_pem(ctx, cert.pem)
    except ssl.SSLError as exc:
        raise _Refused(cert, CertProblem(
            "cert_path", cert.source.cert_path, f"OpenSSL refuses it: {exc.reason or exc}",
            "use a stronger key (RSA 2048+ or EC P-256) and a SHA-256 signature")) from None
    return ctx


def _load_pem(ctx: ssl.SSLContext, pem: bytes) -> None:
    """Load exactly the bytes that were checked (not the file again, which may have
    changed meanwhile), through an anonymous in-memory file."""
    memfd = getattr(os, "memfd_create", None)
    if memfd is None:  # not Linux: a private temporary file, removed at once
        with tempfile.NamedTemporaryFile(prefix="dynproxy-cert-") as tmp:
            tmp.write(pem)
            tmp.flush()
            ctx.load_cert_chain(tmp.name)
        return
    fd = memfd("dynproxy-cert", os.MFD_CLOEXEC)
    try:
        with open(fd, "wb", closefd=False) as out:
            out.write(pem)
        ctx.load_cert_chain(f"/proc/self/fd/{fd}")
    finally:
        os.close(fd)


def _index(certs: tuple[LoadedCert, ...]) -> tuple[dict[str, int], dict[str, int]]:
    """(exact name -> index, wildcard parent -> index); first claim wins, explicit
    hostnames before certificates' own names, the default certificate's names last."""
    exact: dict[str, int] = {}
    wildcard: dict[str, int] = {}

    def claim(name: str, index: int) -> None:
        if name.startswith("*."):
            wildcard.setdefault(name[2:], index)
        elif "*" not in name:
            exact.setdefault(name, index)

    for i, cert in enumerate(certs):
        if cert.source.hostname:
            claim(cert.source.hostname, i)
    for i, cert in enumerate(certs):
        if i and not cert.source.hostname:
            for name in cert.dns_names:
                claim(name, i)
    if not certs[0].source.hostname:
        for name in certs[0].dns_names:
            claim(name, 0)
    return exact, wildcard


def _config_error(problems: list[tuple], origin) -> ConfigError:
    source = origin.source if origin is not None else "<config>"
    out = []
    for where, problem in problems:
        path = (*where, problem.field)
        mark = origin.marks.find(path) if origin is not None else None
        out.append(ConfigProblem(
            source, mark.line if mark else None, mark.column if mark else None,
            dotted(path), "unusable certificate" if problem.field.endswith("_path")
            else "invalid value", short_repr(problem.value),
            _EXPECTED.get(problem.field, "a usable certificate"), problem.hint,
            problem.message))
    return ConfigError(out)


def _no_certificate(rule, origin) -> ConfigError:
    where = rule.where if rule is not None else "a rule"
    return _config_error([(("tls",), CertProblem(
        "cert_path", "null", f"{where} terminates TLS but no certificate is configured",
        "set tls.cert_path and tls.key_path (or tls.certificates); or forward the "
        "connection without `terminate tls`"))], origin)
