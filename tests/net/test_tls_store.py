"""CertStore: loading and checking certificates, selection by SNI, and real handshakes
against the store's contexts (OpenSSL on both ends, through memory BIOs: no sockets).

Certificates are generated per test session with tools/gen_certs.py's helpers.
"""

from __future__ import annotations

import datetime
import importlib.util
import re
import ssl
import sys
from pathlib import Path

import pytest

from dynproxy.core.config import ConfigError, load_config
from dynproxy.core.decision import TerminateSpec
from dynproxy.net.tls import CertStore, cert_store_for
from dynproxy.net.tls_certs import covers

ROOT = Path(__file__).resolve().parents[2]
NOW = datetime.datetime.now(datetime.timezone.utc)
BY_SNI = TerminateSpec(None, ())


def _gen_certs():
    spec = importlib.util.spec_from_file_location("tools_gen_certs", ROOT / "tools/gen_certs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


gen = _gen_certs()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA and the default, exact (api.example.com) and wildcard certificates."""
    out = tmp_path_factory.mktemp("pki")
    return out, gen.generate(out)


def tls_config(tmp: Path, default=("server",), entries=(), **settings) -> object:
    """A Config whose tls section names files in `tmp` by stem."""
    lines = ["tls:"]
    if default:
        lines += [f"  cert_path: {tmp / (default[0] + '.crt')}",
                  f"  key_path: {tmp / (default[-1] + '.key')}"]
    for key, value in settings.items():
        lines.append(f"  {key}: {value}")
    if entries:
        lines.append("  certificates:")
        for entry in entries:
            stem = entry["stem"]
            lines.append(f"    - cert_path: {tmp / (stem + '.crt')}")
            lines.append(f"      key_path: {tmp / (entry.get('key', stem) + '.key')}")
            for key in ("hostname", "name"):
                if key in entry:
                    lines.append(f'      {key}: "{entry[key]}"')
    return load_config("\n".join(lines) + "\n", "test.yaml")


STANDARD = ({"stem": "api", "hostname": "api.example.com"},
            {"stem": "wildcard", "hostname": "*.example.com"})


def handshake(ctx: ssl.SSLContext, sni: str | None, ca: Path, alpn=None, **client):
    """A real handshake between a client SSLObject and `ctx`; (peer cert dict, alpn)."""
    cctx = ssl.create_default_context(cafile=str(ca))
    cctx.check_hostname = False
    for key, value in client.items():
        setattr(cctx, key, value)
    if alpn:
        cctx.set_alpn_protocols(alpn)
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    cli = cctx.wrap_bio(c_in, c_out, server_hostname=sni)
    srv = ctx.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(8):
        for end in (cli, srv):
            try:
                end.do_handshake()
            except ssl.SSLWantReadError:
                pass
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    cli.do_handshake()  # raises if it did not complete
    return cli.getpeercert(), srv.selected_alpn_protocol()


def served_names(store, sni, ca) -> list[str]:
    cert, _ = handshake(store.context(BY_SNI), sni, ca)
    return [v for k, v in cert["subjectAltName"] if k == "DNS"]


# --- selection ------------------------------------------------------------------------


@pytest.mark.parametrize("sni, names, fallback", [
    ("api.example.com", ["api.example.com"], None),
    ("API.Example.COM.", ["api.example.com"], None),
    ("shop.example.com", ["*.example.com"], None),
    ("a.b.example.com", ["localhost"], "unknown_name"),  # one label only
    ("example.com", ["localhost"], "unknown_name"),  # not the apex
    ("localhost", ["localhost"], None),  # the default certificate's own name
    ("other.test", ["localhost"], "unknown_name"),
    (None, ["localhost"], "no_sni"),
])
def test_selection_exact_then_wildcard_then_default(pki, sni, names, fallback):
    out, files = pki
    store = CertStore.load(tls_config(out, entries=STANDARD).tls)
    index, reason = store.select(sni)
    assert reason == fallback
    assert store.certs[index].dns_names == tuple(names)
    assert served_names(store, sni, files["ca"].cert_path) == names


def test_strict_sni_fails_the_handshake_for_unknown_names(pki):
    out, files = pki
    store = CertStore.load(tls_config(out, entries=STANDARD, strict_sni="true").tls)
    assert store.select("nope.test") == (0, "strict_refused")
    with pytest.raises(ssl.SSLError, match="CALLBACK_FAILED|UNRECOGNIZED_NAME"):
        served_names(store, "nope.test", files["ca"].cert_path)
    # known names and no SNI are still served
    assert served_names(store, "api.example.com", files["ca"].cert_path) == ["api.example.com"]
    assert served_names(store, None, files["ca"].cert_path) == ["localhost"]


def test_entry_without_hostname_is_selected_by_its_names(pki, tmp_path):
    out, files = pki
    ca = gen.Issued(*_ca_of(out))
    pair = gen.write_pair(gen.make_leaf(ca, ["one.test", "*.two.test"]), tmp_path, "multi")
    cfg = tls_config(out, entries=[{"stem": str(tmp_path / "multi"), "name": "multi"}])
    store = CertStore.load(cfg.tls)
    assert pair.cert_path.exists()
    for sni in ("one.test", "x.two.test"):
        assert served_names(store, sni, files["ca"].cert_path) == ["one.test", "*.two.test"]
    assert served_names(store, "y.x.two.test", files["ca"].cert_path) == ["localhost"]
    fixed = store.context(TerminateSpec("multi", ()))
    cert, _ = handshake(fixed, "api.example.com", files["ca"].cert_path)
    assert ("DNS", "one.test") in cert["subjectAltName"]


def test_without_cert_path_the_first_entry_is_the_default(pki):
    out, files = pki
    store = CertStore.load(tls_config(out, default=(), entries=STANDARD).tls)
    assert served_names(store, None, files["ca"].cert_path) == ["api.example.com"]
    assert served_names(store, "x.example.com", files["ca"].cert_path) == ["*.example.com"]


@pytest.mark.parametrize("names, hostname, expected", [
    (("api.example.com",), "api.example.com", True),
    (("*.example.com",), "api.example.com", True),
    (("*.example.com",), "a.b.example.com", False),
    (("*.example.com",), "example.com", False),
    (("*.example.com",), "*.example.com", True),
    (("api.example.com",), "*.example.com", False),
])
def test_covers(names, hostname, expected):
    assert covers(names, hostname) is expected


# --- ALPN and protocol versions ----------------------------------------------------------


def test_alpn_from_the_rule_then_the_config(pki):
    out, files = pki
    store = CertStore.load(tls_config(out, entries=STANDARD, alpn='["http/1.1"]').tls)
    ca = files["ca"].cert_path
    _, chosen = handshake(store.context(BY_SNI), "api.example.com", ca, ["h2", "http/1.1"])
    assert chosen == "http/1.1"
    rule = TerminateSpec(None, ("h2",))
    _, chosen = handshake(store.context(rule), "api.example.com", ca, ["h2", "http/1.1"])
    assert chosen == "h2"
    _, chosen = handshake(store.context(rule), "api.example.com", ca, ["http/1.1"])
    assert chosen is None  # nothing in common: no ALPN, the handshake still succeeds


@pytest.mark.filterwarnings("ignore:ssl.TLSVersion:DeprecationWarning")
def test_tls_1_1_is_refused_and_1_3_can_be_required(pki):
    out, files = pki
    ca = files["ca"].cert_path
    store = CertStore.load(tls_config(out).tls)
    with pytest.raises(ssl.SSLError):
        handshake(store.context(BY_SNI), None, ca,
                  minimum_version=ssl.TLSVersion.MINIMUM_SUPPORTED,
                  maximum_version=ssl.TLSVersion.TLSv1_1)
    handshake(store.context(BY_SNI), None, ca, maximum_version=ssl.TLSVersion.TLSv1_2)
    strict = CertStore.load(tls_config(out, min_version='"1.3"').tls)
    with pytest.raises(ssl.SSLError):
        handshake(strict.context(BY_SNI), None, ca, maximum_version=ssl.TLSVersion.TLSv1_2)


# --- checks at load ----------------------------------------------------------------------


def _ca_of(out: Path):
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key((out / "ca.key").read_bytes(), None)
    return cert, key


def problems_of(cfg) -> str:
    with pytest.raises(ConfigError) as info:
        CertStore.load(cfg.tls, cfg.origin)
    return str(info.value)


def test_expired_certificate_is_an_error_naming_the_file(pki, tmp_path):
    out, _ = pki
    ca = gen.Issued(*_ca_of(out))
    old = gen.make_leaf(ca, ["old.test"], days=10, not_before=NOW - datetime.timedelta(days=20))
    gen.write_pair(old, tmp_path, "old")
    text = problems_of(tls_config(tmp_path, default=("old",)))
    assert f"tls.cert_path: unusable certificate '{tmp_path / 'old.crt'}'" in text
    assert "expired on" in text and "days ago" in text
    assert "test.yaml:2:" in text  # where the key is in the config
    assert "help: renew it, or set tls.allow_expired: true" in text


def test_allow_expired_loads_it_with_a_warning(pki, tmp_path):
    out, _ = pki
    ca = gen.Issued(*_ca_of(out))
    old = gen.make_leaf(ca, ["old.test"], days=10, not_before=NOW - datetime.timedelta(days=20))
    gen.write_pair(old, tmp_path, "old")
    store = CertStore.load(tls_config(tmp_path, default=("old",), allow_expired="true").tls)
    assert any("expired on" in w for w in store.warnings)


def test_expiring_within_14_days_is_a_warning(pki, tmp_path):
    out, _ = pki
    ca = gen.Issued(*_ca_of(out))
    gen.write_pair(gen.make_leaf(ca, ["soon.test"], days=5), tmp_path, "soon")
    store = CertStore.load(tls_config(tmp_path, default=("soon",)).tls)
    assert len(store.warnings) == 1
    assert store.warnings[0].startswith("tls.cert_path: ")
    assert re.search(r"expires in [34]\.\d days", store.warnings[0])


def test_mismatched_key_is_an_error_naming_both_files(pki):
    out, _ = pki
    text = problems_of(tls_config(out, default=("api", "wildcard")))
    assert f"tls.key_path: unusable certificate '{out / 'wildcard.key'}'" in text
    assert f"does not belong to the certificate in '{out / 'api.crt'}'" in text


def test_hostname_not_covered_by_the_certificate(pki):
    out, _ = pki
    cfg = tls_config(out, entries=[{"stem": "api", "hostname": "www.example.com"}])
    text = problems_of(cfg)
    assert "tls.certificates[0].hostname: invalid value 'www.example.com'" in text
    assert "its names are ['api.example.com']" in text


def test_every_problem_is_reported_at_once(pki, tmp_path):
    out, _ = pki
    (tmp_path / "junk.crt").write_text("not a certificate\n")
    (tmp_path / "junk.key").write_text("nor a key\n")
    cfg = tls_config(out, entries=[{"stem": str(tmp_path / "junk")},
                                   {"stem": str(tmp_path / "missing")}])
    text = problems_of(cfg)
    assert "invalid configuration (2 problems)" in text
    assert "tls.certificates[0].cert_path" in text and "not a PEM certificate chain" in text
    assert "tls.certificates[1].cert_path" in text and "cannot read the certificate" in text


def test_chain_out_of_order_and_encrypted_key(pki, tmp_path):
    out, files = pki
    wrong = tmp_path / "wrong.crt"
    wrong.write_bytes(files["default"].cert_path.read_bytes()
                      + files["exact"].cert_path.read_bytes())
    from cryptography.hazmat.primitives import serialization
    key = serialization.load_pem_private_key(files["default"].key_path.read_bytes(), None)
    (tmp_path / "locked.key").write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    cfg = load_config(f"tls:\n  cert_path: {wrong}\n  key_path: {tmp_path / 'locked.key'}\n",
                      "t.yaml")
    text = problems_of(cfg)
    assert "certificate 2 of the chain ('CN=api.example.com') did not issue certificate 1" \
        in text
    assert "the key is encrypted with a passphrase" in text


def test_unknown_certificate_names_fail_the_load(pki):
    out, _ = pki
    store = CertStore.load(tls_config(out, entries=STANDARD).tls)
    with pytest.raises(ConfigError, match="terminate tls cert nope"):
        store.prepare([TerminateSpec("nope", ())])


def test_rules_that_terminate_need_a_certificate():
    class Rules:
        decisions = (type("D", (), {"terminate": BY_SNI, "rule": type(
            "R", (), {"where": "main.rules:3"})()})(),)

    with pytest.raises(ConfigError, match="main.rules:3 terminates TLS but no certificate"):
        cert_store_for(load_config(None), Rules())
    assert cert_store_for(load_config(None), type("R", (), {"decisions": ()})()) is None


def test_reloaded_reads_the_files_again_and_changed_notices_replacement(pki, tmp_path):
    out, _ = pki
    ca = gen.Issued(*_ca_of(out))
    gen.write_pair(gen.make_leaf(ca, ["a.test"]), tmp_path, "site")
    store = CertStore.load(tls_config(tmp_path, default=("site",)).tls)
    assert not store.changed()
    gen.write_pair(gen.make_leaf(ca, ["b.test"]), tmp_path, "site")
    assert store.changed()
    assert store.reloaded().certs[0].dns_names == ("b.test",)
    (tmp_path / "site.key").write_text("broken\n")
    with pytest.raises(ConfigError, match="not a PEM private key"):
        store.reloaded()
    assert store.certs[0].dns_names == ("a.test",)  # the old store is untouched
