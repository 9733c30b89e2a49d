"""Picks up certificate files replaced on disk while the proxy runs, and exports how
many days each certificate has left.

`CertWatcher` polls the serving snapshot's CertStore every `tls.watch_interval`
(a stat of each file: inode, size, mtime). When a file changed it loads a new store
off to the side and swaps a copy of the snapshot carrying it (build-then-swap, same
generation): new handshakes use the new certificate, open connections keep theirs. A
replacement that cannot be used is logged once (until the files change again) and the
old certificates keep serving. SIGHUP reloads go through build_snapshot instead; this
only watches.

Owned by the Server of each serving process (every worker holds its own store):
`start(serving)`, `reconfigure(serving)` after a reload, `stop()`.
"""

from __future__ import annotations

import dataclasses
import logging

import gevent

from dynproxy.core.config_problems import ConfigError

__all__ = ["CertWatcher"]

log = logging.getLogger("dynproxy.tls")
IDLE_POLL = 5.0  # seconds between looks when the snapshot has no certificates


class CertWatcher:
    """One greenlet polling certificate files; see the module docstring."""

    def __init__(self, metrics):
        self.metrics = metrics
        self.serving = None
        self._greenlet = None
        self._failed: tuple | None = None  # stamps of a replacement known to be bad
        self._published: set[str] = set()

    def start(self, serving) -> None:
        self.serving = serving
        self.publish_expiry()
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def reconfigure(self, serving) -> None:
        self.serving = serving
        self._failed = None
        self.publish_expiry()

    def stop(self) -> None:
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill()

    def _run(self) -> None:
        while True:
            store = self.serving.current.tls
            gevent.sleep(store.settings.watch_interval if store is not None else IDLE_POLL)
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad poll
                log.exception("certificate watcher: unexpected error")

    def check(self) -> bool:
        """One poll; True when a new certificate store was swapped in."""
        snap = self.serving.current
        store = snap.tls
        if store is None:
            return False
        self.publish_expiry()
        if not store.changed():
            return False
        stamps = store.disk_stamps()
        if stamps == self._failed:
            return False
        try:
            new = store.reloaded()
        except ConfigError as exc:
            self._failed = stamps
            log.error("certificate files changed but cannot be used; the previous "
                      "certificates keep serving: %s", exc)
            return False
        if self.serving.current is not snap:
            return False  # a reload swapped meanwhile; the next poll looks again
        self.serving.swap(dataclasses.replace(snap, tls=new))
        self._failed = None
        log.info("certificates reloaded from disk: %s",
                 ", ".join(c.source.label for c in new.certs))
        for warning in new.warnings:
            log.warning("certificate: %s", warning)
        self.publish_expiry()
        return True

    def publish_expiry(self) -> None:
        """proxy_certificate_expiry_days{cert} for the serving certificates only."""
        store = self.serving.current.tls if self.serving is not None else None
        gauge = self.metrics.certificate_expiry_days
        labels = set()
        for cert in store.certs if store is not None else ():
            days = cert.days_left()
            if days is not None:
                gauge.labels(cert.source.label).set(round(days, 3))
                labels.add(cert.source.label)
        for gone in self._published - labels:
            gauge.remove(gone)
        self._published = labels
