"""Reading and checking the certificate files named by the `tls:` section.

For each configured pair (the default `tls.cert_path`/`key_path`, then every
`tls.certificates[]` entry) this reads the files once, checks them (the chain parses
and is in order, the key belongs to the leaf, the validity dates, the names cover the
entry's `hostname`) and returns a `LoadedCert`: the facts `dynproxy certs list` shows,
the problems found (fatal or warnings), the file stamps the watcher compares, and the
exact PEM bytes that were checked, which are what OpenSSL later loads.

It never raises for a bad file (problems are data) and never imports ssl, gevent or
socket: `dynproxy certs list` uses it without starting anything. Relative paths are
relative to the working directory, as the operator typed them.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

__all__ = ["CertProblem", "CertSource", "FileStamp", "LoadedCert", "cert_sources",
           "covers", "load_pair", "EXPIRY_WARNING_DAYS"]

EXPIRY_WARNING_DAYS = 14
MAX_PEM_BYTES = 1 << 20  # a chain plus key is a few KiB; refuse to slurp a wrong huge file
_DAY = 86400.0
_SPKI = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What a replaced file changes: inode (atomic rename), size, mtime (rewrite)."""

    dev: int
    ino: int
    size: int
    mtime_ns: int

    @classmethod
    def of(cls, path: str) -> FileStamp | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return cls(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


@dataclass(frozen=True, slots=True)
class CertSource:
    """One configured certificate: where it is declared and its files."""

    where: tuple  # config path of the entry: ("tls",) or ("tls", "certificates", 2)
    cert_path: str
    key_path: str
    hostname: str | None
    name: str | None

    @property
    def label(self) -> str:
        """Bounded, operator-chosen name for metrics and tables."""
        if len(self.where) == 1:
            return "default"
        return self.name or self.hostname or os.path.basename(self.cert_path)


@dataclass(frozen=True, slots=True)
class CertProblem:
    """Something wrong with one certificate: which field/file, what, and what to do."""

    field: str  # "cert_path" | "key_path" | "hostname" | "name"
    value: str  # the file path or the hostname, as configured
    message: str
    hint: str
    fatal: bool = True

    def __str__(self) -> str:
        return f"{self.value}: {self.message}"


@dataclass(frozen=True, slots=True)
class LoadedCert:
    """One certificate pair as read from disk, with every problem found."""

    source: CertSource
    dns_names: tuple[str, ...] = ()  # lower-case SAN DNS names, wildcards included
    ip_names: tuple[str, ...] = ()
    subject: str = ""
    issuer: str = ""
    not_before: datetime.datetime | None = None
    not_after: datetime.datetime | None = None
    chain_length: int = 0
    stamps: tuple = (None, None)  # FileStamp of cert_path, key_path as read
    problems: tuple[CertProblem, ...] = ()
    pem: bytes = field(default=b"", repr=False)  # chain then key, exactly as checked

    @property
    def ok(self) -> bool:
        return not any(p.fatal for p in self.problems)

    @property
    def warnings(self) -> tuple[CertProblem, ...]:
        return tuple(p for p in self.problems if not p.fatal)

    def days_left(self, now: datetime.datetime | None = None) -> float | None:
        if self.not_after is None:
            return None
        now = now or _now()
        return (self.not_after - now).total_seconds() / _DAY


def cert_sources(tls_cfg) -> tuple[CertSource, ...]:
    """The configured pairs, default first (the config checks that cert_path and
    key_path come together and that hostnames and names are unique). Without
    `tls.cert_path` the first `certificates` entry is the default."""
    sources = []
    if tls_cfg.cert_path:
        sources.append(CertSource(("tls",), tls_cfg.cert_path, tls_cfg.key_path, None, None))
    for i, entry in enumerate(tls_cfg.certificates):
        sources.append(CertSource(("tls", "certificates", i), entry.cert_path,
                                  entry.key_path, entry.hostname, entry.name))
    return tuple(sources)


def load_pair(source: CertSource, *, allow_expired: bool = False,
              now: datetime.datetime | None = None) -> LoadedCert:
    """Read and check one pair; problems are returned, never raised."""
    now = now or _now()
    cert_data, cert_stamp, problem = _read(source.cert_path, "cert_path", "certificate")
    if problem:
        return LoadedCert(source, problems=(problem,))
    chain, problem = _parse_chain(source.cert_path, cert_data)
    if problem:
        return LoadedCert(source, stamps=(cert_stamp, None), problems=(problem,))
    facts = _facts(chain[0], source.cert_path)
    problems = [*_chain_order(source.cert_path, chain), *facts.pop("problems")]
    problems += _validity(source.cert_path, chain, allow_expired, now)
    key_pem, key_stamp, key_problems = _key(source, chain[0])
    problems += key_problems
    problems += _hostname(source, facts["dns_names"])
    pem = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain) + key_pem
    return LoadedCert(source, chain_length=len(chain), stamps=(cert_stamp, key_stamp),
                      problems=tuple(problems), pem=pem, **facts)


def covers(names: tuple[str, ...], hostname: str) -> bool:
    """Does a certificate with these DNS names serve `hostname` (itself maybe '*.x')?"""
    if hostname in names:
        return True
    if hostname.startswith("*."):
        return False
    _, dot, parent = hostname.partition(".")
    return bool(dot) and f"*.{parent}" in names


# --- the steps -----------------------------------------------------------------------


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _read(path: str, fld: str, what: str):
    """(bytes, FileStamp, None) or (None, None, CertProblem)."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            data = f.read(MAX_PEM_BYTES + 1)
    except OSError as exc:
        return None, None, CertProblem(fld, path, f"cannot read the {what}: "
                                       f"{exc.strerror or exc}",
                                       "check the path and that dynproxy may read it")
    if len(data) > MAX_PEM_BYTES:
        return None, None, CertProblem(fld, path, f"larger than {MAX_PEM_BYTES} bytes: "
                                       f"not a PEM {what}", "point it at the PEM file")
    return data, FileStamp(st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns), None


def _parse_chain(path: str, data: bytes):
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        return None, CertProblem("cert_path", path, f"not a PEM certificate chain "
                                 f"({_first_line(exc)})", "the file must hold "
                                 "'-----BEGIN CERTIFICATE-----' blocks, leaf first")
    return chain, None


def _facts(leaf: x509.Certificate, path: str) -> dict:
    dns, ips, problems = _san(leaf, path)
    cn = _common_name(leaf)
    if not dns and not ips and cn:
        dns = (cn.lower().rstrip("."),)
        problems.append(CertProblem(
            "cert_path", path, f"no subjectAltName: only the CN {cn!r} names it, which "
            "clients ignore", "reissue it with the names as subjectAltName DNS entries",
            fatal=False))
    return {"dns_names": dns, "ip_names": ips, "subject": leaf.subject.rfc4514_string(),
            "issuer": leaf.issuer.rfc4514_string(), "not_before": leaf.not_valid_before_utc,
            "not_after": leaf.not_valid_after_utc, "problems": problems}


def _san(leaf: x509.Certificate, path: str):
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return (), (), []
    except ValueError as exc:
        return (), (), [CertProblem("cert_path", path, f"unreadable subjectAltName "
                                    f"({_first_line(exc)})", "reissue the certificate")]
    dns = tuple(dict.fromkeys(n.lower().rstrip(".") for n in san.get_values_for_type(
        x509.DNSName)))
    ips = tuple(str(ipaddress.ip_address(ip)) for ip in san.get_values_for_type(
        x509.IPAddress))
    return dns, ips, []


def _common_name(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    value = attrs[0].value if attrs else None
    return value if isinstance(value, str) else None


def _chain_order(path: str, chain: list) -> list[CertProblem]:
    """Each certificate must be issued by the next one (leaf first)."""
    for i in range(len(chain) - 1):
        child, parent = chain[i], chain[i + 1]
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm) as exc:
            return [CertProblem(
                "cert_path", path, f"certificate {i + 2} of the chain "
                f"({parent.subject.rfc4514_string()!r}) did not issue certificate {i + 1} "
                f"({child.subject.rfc4514_string()!r}): {_first_line(exc) or 'bad signature'}",
                "order the file leaf first, then each issuer; leave out unrelated "
                "certificates")]
    return []


def _validity(path: str, chain: list, allow_expired: bool, now) -> list[CertProblem]:
    leaf = chain[0]
    after, before = leaf.not_valid_after_utc, leaf.not_valid_before_utc
    days = (after - now).total_seconds() / _DAY
    if days < 0:
        return [CertProblem("cert_path", path, f"expired on {after:%Y-%m-%d %H:%M} UTC "
                            f"({-days:.1f} days ago)", "renew it, or set "
                            "tls.allow_expired: true to serve it anyway",
                            fatal=not allow_expired)]
    out = []
    if before > now:
        out.append(CertProblem("cert_path", path, f"not valid before {before:%Y-%m-%d %H:%M}"
                               " UTC: clients will refuse it until then",
                               "check this machine's clock and the certificate's dates",
                               fatal=False))
    if days < EXPIRY_WARNING_DAYS:
        out.append(CertProblem("cert_path", path, f"expires in {days:.1f} days "
                               f"({after:%Y-%m-%d %H:%M} UTC)", "renew it soon",
                               fatal=False))
    for cert in chain[1:]:
        if cert.not_valid_after_utc < now:
            out.append(CertProblem("cert_path", path, "an intermediate certificate "
                                   f"({cert.subject.rfc4514_string()!r}) has expired",
                                   "fetch the current chain from the issuer",
                                   fatal=not allow_expired))
    return out


def _key(source: CertSource, leaf):
    """(unencrypted PEM of the key, its FileStamp, problems)."""
    data, stamp, problem = _read(source.key_path, "key_path", "private key")
    if problem:
        return b"", None, [problem]
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        return b"", stamp, [CertProblem("key_path", source.key_path, "the key is encrypted "
                                        "with a passphrase", "store it unencrypted (mode "
                                        "0600): openssl pkey -in KEY -out KEY.plain")]
    except (ValueError, UnsupportedAlgorithm) as exc:
        return b"", stamp, [CertProblem("key_path", source.key_path, f"not a PEM private key "
                                        f"({_first_line(exc)})", "point key_path at the "
                                        "'-----BEGIN ... PRIVATE KEY-----' file")]
    if key.public_key().public_bytes(*_SPKI) != leaf.public_key().public_bytes(*_SPKI):
        return b"", stamp, [CertProblem("key_path", source.key_path, "this key does not "
                                        f"belong to the certificate in {source.cert_path!r}",
                                        "pair each certificate with its own key")]
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    return pem, stamp, []


def _hostname(source: CertSource, names: tuple[str, ...]) -> list[CertProblem]:
    if source.hostname is None or covers(names, source.hostname):
        return []
    return [CertProblem("hostname", source.hostname, f"the certificate "
                        f"{source.cert_path!r} does not cover it: its names are "
                        f"{list(names)!r}", "use a certificate issued for that name, or "
                        "fix hostname")]


def _first_line(exc: BaseException) -> str:
    return str(exc).split("\n", 1)[0].split(". See https://", 1)[0]
