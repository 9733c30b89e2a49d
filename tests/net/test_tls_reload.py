"""Certificates changed while the proxy runs: replaced files picked up by the watcher
(in this process) and by SIGHUP (a real `python -m dynproxy`), an earlier connection
that keeps working through the change, and a broken replacement that keeps the old
certificate serving.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import ssl
import time
from pathlib import Path

import gevent
import pytest
from cryptography import x509

from dynproxy.net.state import Serving
from dynproxy.net.tcp import TcpProxy, open_tcp_listener
from dynproxy.net.tls_watch import CertWatcher
from dynproxy.obs.metrics import init_metrics
from dynproxy.proc.build import Sources, build_snapshot


def load_ca(tls_certs):
    from cryptography.hazmat.primitives import serialization
    from tools_gen_certs import Issued  # registered by the tls_certs fixture

    ca = tls_certs["ca"]
    return Issued(x509.load_pem_x509_certificate(ca.cert_path.read_bytes()),
                  serialization.load_pem_private_key(ca.key_path.read_bytes(), None))


def issue(tls_certs, directory: Path, stem: str, names, *, atomic: bool = True) -> int:
    """Write a fresh STEM.crt/STEM.key for `names`; returns the new serial number.

    atomic: written aside and renamed over the old files (what deploy tools do);
    otherwise rewritten in place.
    """
    from tools_gen_certs import make_leaf, write_pair

    leaf = make_leaf(load_ca(tls_certs), list(names))
    if not atomic:
        write_pair(leaf, directory, stem)
        return leaf.cert.serial_number
    files = write_pair(leaf, directory / "staging", stem)
    os.replace(files.key_path, directory / f"{stem}.key")
    os.replace(files.cert_path, directory / f"{stem}.crt")
    return leaf.cert.serial_number


def config_text(directory: Path, interval: str = "1h") -> str:
    return (f"server:\n  workers: 1\n  timeouts:\n    connect: 1s\n"
            f"shutdown:\n  drain_timeout: 0s\n"
            f"tls:\n  cert_path: {directory / 'site.crt'}\n  key_path: {directory / 'site.key'}\n"
            f"  watch_interval: {interval}\n")


def open_tls(port: int, tls_certs, sni: str = "site.test"):
    """(tls socket, serial number of the certificate served) after reading the greeting."""
    ctx = ssl.create_default_context(cafile=str(tls_certs["ca"].cert_path))
    tls = ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                          server_hostname=sni)
    serial = x509.load_der_x509_certificate(tls.getpeercert(binary_form=True)).serial_number
    assert tls.recv(100) == b"backend=web\n"
    return tls, serial


def echo(tls, data: bytes = b"still here") -> bytes:
    tls.sendall(data)
    return tls.recv(100)


def served_serial(port: int, tls_certs) -> int:
    tls, serial = open_tls(port, tls_certs)
    tls.close()
    return serial


def wait_for_serial(port: int, tls_certs, serial: int) -> int:
    deadline = time.monotonic() + 10
    while (got := served_serial(port, tls_certs)) != serial and time.monotonic() < deadline:
        time.sleep(0.05)
    return got


# --- the watcher, in this process ----------------------------------------------------------


class InProcess:
    """A TcpProxy serving a snapshot built from files, and a CertWatcher for it."""

    def __init__(self, tmp_path: Path, web_address: str, interval: str):
        rules = tmp_path / "main.rules"
        rules.write_text(f"backend web {web_address}\ndefault -> terminate tls then forward(web)\n")
        config = tmp_path / "dynproxy.yaml"
        config.write_text(config_text(tmp_path, interval))
        self.metrics = init_metrics(None)
        self.serving = Serving(build_snapshot(Sources(str(rules), str(config), {})))
        self.proxy = TcpProxy(open_tcp_listener("127.0.0.1", 0, 64, False), "tls",
                              self.serving, self.metrics, 100)
        self.proxy.start()
        self.port = self.proxy.port
        self.watcher = CertWatcher(self.metrics)

    def expiry(self, cert: str) -> float | None:
        return self.metrics.registry.get_sample_value("proxy_certificate_expiry_days",
                                                      {"cert": cert})

    def close(self):
        self.watcher.stop()
        self.proxy.stop_accepting()
        self.proxy.kill_all(timeout=1)


@pytest.fixture
def in_process(tmp_path, backends):
    made = []

    def start(interval: str = "1h") -> InProcess:
        made.append(InProcess(tmp_path, backends("web").address, interval))
        return made[-1]

    yield start
    for harness in made:
        harness.close()


@pytest.mark.parametrize("atomic", [True, False], ids=["renamed", "rewritten"])
def test_watcher_swaps_in_a_replaced_certificate_while_a_connection_stays_open(
        tmp_path, tls_certs, in_process, atomic):
    first = issue(tls_certs, tmp_path, "site", ["site.test"])
    harness = in_process()
    harness.watcher.start(harness.serving)
    generation = harness.serving.current.generation
    early, serial = open_tls(harness.port, tls_certs)
    assert serial == first
    assert harness.watcher.check() is False  # nothing changed yet
    second = issue(tls_certs, tmp_path, "site", ["site.test"], atomic=atomic)
    assert harness.watcher.check() is True
    assert served_serial(harness.port, tls_certs) == second
    assert echo(early) == b"still here"  # the earlier connection keeps its session
    early.close()
    assert harness.serving.current.generation == generation  # only the certificates moved
    assert 360 < harness.expiry("default") < 366


def test_a_broken_replacement_keeps_the_old_certificate_and_is_logged_once(
        tmp_path, tls_certs, in_process, caplog):
    serial = issue(tls_certs, tmp_path, "site", ["site.test"])
    harness = in_process()
    harness.watcher.start(harness.serving)
    (tmp_path / "site.crt").write_text("-----BEGIN CERTIFICATE-----\ntruncated\n")
    with caplog.at_level(logging.ERROR, logger="dynproxy.tls"):
        assert harness.watcher.check() is False
        assert harness.watcher.check() is False
    errors = [r.getMessage() for r in caplog.records if r.name == "dynproxy.tls"]
    assert len(errors) == 1
    assert "the previous certificates keep serving" in errors[0]
    assert f"{tmp_path / 'site.crt'}" in errors[0] and "not a PEM certificate" in errors[0]
    assert served_serial(harness.port, tls_certs) == serial
    fixed = issue(tls_certs, tmp_path, "site", ["site.test"])
    assert harness.watcher.check() is True
    assert served_serial(harness.port, tls_certs) == fixed


def test_the_watcher_greenlet_polls_by_itself(tmp_path, tls_certs, in_process):
    issue(tls_certs, tmp_path, "site", ["site.test"])
    harness = in_process(interval="50ms")
    harness.watcher.start(harness.serving)
    replaced = issue(tls_certs, tmp_path, "site", ["site.test"])
    assert wait_for_serial(harness.port, tls_certs, replaced) == replaced
    harness.watcher.stop()
    gevent.sleep(0)
    assert harness.watcher._greenlet is None


# --- SIGHUP, through a real proxy ------------------------------------------------------------


def test_sighup_picks_up_a_replaced_certificate_and_keeps_an_open_connection(
        tmp_path, tls_certs, proxy, backends):
    first = issue(tls_certs, tmp_path, "site", ["site.test"])
    web = backends("web")
    p = proxy(f"backend web {web.address}\ndefault -> terminate tls then forward(web)\n",
              config=config_text(tmp_path), udp=False)
    early, serial = open_tls(p.tcp_port, tls_certs)
    assert serial == first
    second = issue(tls_certs, tmp_path, "site", ["site.test"])
    p.signal(signal.SIGHUP)
    assert wait_for_serial(p.tcp_port, tls_certs, second) == second
    assert echo(early) == b"still here"
    # a broken replacement: the reload fails, the last good certificate keeps serving
    (tmp_path / "site.key").write_text("not a key\n")
    p.signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "not a PEM private key" not in p.logs() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert f"{tmp_path / 'site.key'}" in p.logs()
    assert served_serial(p.tcp_port, tls_certs) == second
    assert echo(early, b"and still") == b"and still"
    early.close()
