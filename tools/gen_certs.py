"""Generate a test CA and server certificates for dynproxy's TLS examples and tests.

    python tools/gen_certs.py OUT_DIR [--exact api.example.com] [--wildcard "*.example.com"]
                              [--default-name localhost] [--days 365] [--key-type ec|rsa]

writes, into OUT_DIR (created if missing):

    ca.crt, ca.key              the CA that signs the others (give it to clients: --ca)
    server.crt, server.key      the default certificate (DEFAULT_NAME, 127.0.0.1, ::1)
    api.crt, api.key            the exact-name certificate (stem: first label of --exact)
    wildcard.crt, wildcard.key  the one-label wildcard certificate

and prints the matching `tls:` section for config/dynproxy.yaml. Keys are written
unencrypted with mode 0600. The functions (`make_ca`, `make_leaf`, `write_pair`,
`generate`) are importable so tests can also make expired or mismatched pairs.
Test material only: never use these keys for anything real.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

ONE_DAY = datetime.timedelta(days=1)


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate and its private key."""

    cert: x509.Certificate
    key: object  # a cryptography private key


@dataclass(frozen=True, slots=True)
class PemFiles:
    """Where one certificate and its key were written."""

    cert_path: Path
    key_path: Path


def make_key(key_type: str = "ec"):
    """A fresh private key: EC P-256 (fast, the default) or RSA 2048."""
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unknown key type {key_type!r}; use 'ec' or 'rsa'")


def make_ca(common_name: str = "dynproxy test CA", *, days: int = 3650,
            key_type: str = "ec") -> Issued:
    """A self-signed CA certificate allowed to sign server certificates."""
    key = make_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        _base(name, name, key.public_key(), now - ONE_DAY, now + days * ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    return Issued(builder.sign(key, hashes.SHA256()), key)


def make_leaf(ca: Issued, names: Sequence[str], *, days: int = 365,
              not_before: datetime.datetime | None = None, key=None,
              key_type: str = "ec") -> Issued:
    """A server certificate for `names` (DNS names or IP addresses), signed by `ca`.

    The first name is also the subject CN. `not_before` and `days` allow expired or
    not-yet-valid certificates; `key` reuses a key (or pass another to mismatch).
    """
    if not names:
        raise ValueError("a server certificate needs at least one name")
    key = key or make_key(key_type)
    start = not_before or datetime.datetime.now(datetime.timezone.utc) - ONE_DAY
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])])
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    builder = (
        _base(subject, ca.cert.subject, key.public_key(), start, start + days * ONE_DAY)
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]),
                       critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski),
                       critical=False)
    )
    return Issued(builder.sign(ca.key, hashes.SHA256()), key)


def write_pair(issued: Issued, out_dir: Path, stem: str) -> PemFiles:
    """Write STEM.crt and STEM.key (0600) into out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    files = PemFiles(out_dir / f"{stem}.crt", out_dir / f"{stem}.key")
    files.cert_path.write_bytes(issued.cert.public_bytes(serialization.Encoding.PEM))
    key_pem = issued.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(files.key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(key_pem)
    return files


def generate(out_dir: str | os.PathLike, *, exact: str = "api.example.com",
             wildcard: str = "*.example.com", default_name: str = "localhost",
             days: int = 365, key_type: str = "ec") -> dict[str, PemFiles]:
    """Write the CA and the default, exact and wildcard certificates; return their files.

    Keys of the result: "ca", "default", "exact", "wildcard".
    """
    out = Path(out_dir)
    ca = make_ca(days=days + 1, key_type=key_type)
    leaves = {
        "default": ("server", [default_name, "127.0.0.1", "::1"]),
        "exact": (exact.split(".")[0] or "exact", [exact]),
        "wildcard": ("wildcard", [wildcard]),
    }
    files = {"ca": write_pair(ca, out, "ca")}
    for role, (stem, names) in leaves.items():
        files[role] = write_pair(make_leaf(ca, names, days=days, key_type=key_type), out, stem)
    return files


def config_snippet(files: dict[str, PemFiles], exact: str, wildcard: str) -> str:
    """The `tls:` section of config/dynproxy.yaml that uses the generated files."""
    return "\n".join([
        "tls:",
        f"  cert_path: {files['default'].cert_path}",
        f"  key_path: {files['default'].key_path}",
        "  sni_routing: true",
        "  certificates:",
        f"    - hostname: {exact}",
        f"      cert_path: {files['exact'].cert_path}",
        f"      key_path: {files['exact'].key_path}",
        f'    - hostname: "{wildcard}"',
        f"      cert_path: {files['wildcard'].cert_path}",
        f"      key_path: {files['wildcard'].key_path}",
    ])


def _base(subject, issuer, public_key, not_before, not_after) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
    )


def _key_usage(cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True, content_commitment=False, key_encipherment=not cert_sign,
        data_encipherment=False, key_agreement=False, key_cert_sign=cert_sign,
        crl_sign=cert_sign, encipher_only=False, decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="directory to write the PEM files into")
    parser.add_argument("--exact", default="api.example.com", help="exact-name certificate")
    parser.add_argument("--wildcard", default="*.example.com", help="wildcard certificate")
    parser.add_argument("--default-name", default="localhost", help="default certificate's name")
    parser.add_argument("--days", type=int, default=365, help="validity in days")
    parser.add_argument("--key-type", choices=("ec", "rsa"), default="ec")
    args = parser.parse_args(argv)
    if not args.wildcard.startswith("*.") or "*" in args.wildcard[1:]:
        parser.error(f"--wildcard must look like '*.example.com', got {args.wildcard!r}")
    files = generate(args.out_dir, exact=args.exact, wildcard=args.wildcard,
                     default_name=args.default_name, days=args.days, key_type=args.key_type)
    for role, pem in files.items():
        print(f"{role:9} {pem.cert_path}  {pem.key_path}")
    print("\n# for config/dynproxy.yaml:")
    print(config_snippet(files, args.exact, args.wildcard))
    return 0


if __name__ == "__main__":
    sys.exit(main())
