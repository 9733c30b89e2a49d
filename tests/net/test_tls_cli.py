"""`dynproxy certs list`: the table, JSON, problems and exit codes."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from dynproxy.cli.certs import certs

ROOT = Path(__file__).resolve().parents[2]


def write_config(tmp_path: Path, tls_certs, *extra_entries: str) -> Path:
    config = tmp_path / "dynproxy.yaml"
    config.write_text("\n".join([
        "tls:",
        f"  cert_path: {tls_certs['default'].cert_path}",
        f"  key_path: {tls_certs['default'].key_path}",
        "  certificates:",
        "    - hostname: api.example.com",
        "      name: api",
        f"      cert_path: {tls_certs['exact'].cert_path}",
        f"      key_path: {tls_certs['exact'].key_path}",
        *extra_entries,
    ]) + "\n")
    return config


def test_lists_every_certificate_with_names_issuer_expiry_and_files(tmp_path, tls_certs):
    result = CliRunner().invoke(certs, ["list", "--config", str(write_config(tmp_path,
                                                                          tls_certs))])
    assert result.exit_code == 0, result.output
    header, default, api = result.output.splitlines()
    assert header.split()[:4] == ["CERT", "SERVES", "NAMES", "ISSUER"]
    assert default.startswith("default ") and "localhost, 127.0.0.1, ::1" in default
    assert api.startswith("api ") and "api.example.com" in api
    assert "CN=dynproxy test CA" in api
    assert f"{tls_certs['exact'].cert_path}, {tls_certs['exact'].key_path}" in api
    not_after = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=364))
    assert f"{not_after:%Y-%m-%d}" in api and " 364 " in api


def test_problems_are_shown_under_their_certificate_and_exit_1(tmp_path, tls_certs):
    config = write_config(tmp_path, tls_certs,
                          '    - hostname: "*.example.com"',
                          f"      cert_path: {tls_certs['wildcard'].cert_path}",
                          f"      key_path: {tls_certs['exact'].key_path}")
    result = CliRunner().invoke(certs, ["list", "--config", str(config)])
    assert result.exit_code == 1
    lines = result.output.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("*.example.com"))
    assert lines[at + 1] == (f"  error: key_path {tls_certs['exact'].key_path}: this key does not "
                             f"belong to the certificate in '{tls_certs['wildcard'].cert_path}'")
    assert lines[at + 2] == "    help: pair each certificate with its own key"


def test_json_output(tmp_path, tls_certs):
    result = CliRunner().invoke(certs, ["list", "--config", str(write_config(tmp_path, tls_certs)),
                                        "--format", "json"])
    assert result.exit_code == 0
    listed = json.loads(result.output)
    assert [(c["cert"], c["default"], c["names"]) for c in listed] == [
        ("default", True, ["localhost", "127.0.0.1", "::1"]),
        ("api", False, ["api.example.com"])]
    assert listed[1]["usable"] is True and listed[1]["problems"] == []
    assert 363 < listed[1]["days_left"] < 365


def test_bad_config_exits_2_and_no_certificates_is_said(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("tls:\n  strict_sni: maybe\n")
    result = CliRunner().invoke(certs, ["list", "--config", str(bad)])
    assert result.exit_code == 2 and "tls.strict_sni" in result.output
    result = CliRunner().invoke(certs, ["list"])
    assert result.exit_code == 0
    assert result.output == "no certificates configured (tls.cert_path, tls.certificates)\n"


def test_the_dynproxy_command_reaches_it(tmp_path, tls_certs):
    out = subprocess.run([sys.executable, "-m", "dynproxy", "certs", "list", "--config",
                          str(write_config(tmp_path, tls_certs))], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("CERT ")
