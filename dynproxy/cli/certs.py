"""`dynproxy certs list [--config FILE] [--format text|json]`: the certificates of the
`tls:` section as dynproxy sees them.

One row per certificate (the default first): its label, what it serves, the names in
it, issuer, expiry and days left, its files; then each problem found (errors that
would stop the proxy from loading it, and warnings such as an expiry within 14 days).
Exit 0 when every certificate is usable, 1 when one is not, 2 when the config itself
is invalid. Reads files only: imports no gevent and opens no socket.
"""

from __future__ import annotations

import json
import sys

import click

from dynproxy.core.config import ConfigError, load_config, load_config_file
from dynproxy.net.tls_certs import LoadedCert, cert_sources, load_pair

EXIT_OK, EXIT_UNUSABLE, EXIT_BAD_CONFIG = 0, 1, 2
HEADINGS = ("CERT", "SERVES", "NAMES", "ISSUER", "NOT AFTER (UTC)", "DAYS", "FILES")


@click.group()
def certs() -> None:
    """Inspect the TLS certificates of a config."""


@certs.command("list")
@click.option("--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="dynproxy config whose `tls:` section is listed.")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format.")
def list_certs(config_path: str | None, fmt: str) -> None:
    """Names, issuer, expiry, files and problems of each certificate."""
    try:
        cfg = load_config_file(config_path) if config_path else load_config(None)
    except ConfigError as exc:
        click.echo(f"dynproxy certs: {exc}", err=True)
        sys.exit(EXIT_BAD_CONFIG)
    loaded = [load_pair(s, allow_expired=cfg.tls.allow_expired)
              for s in cert_sources(cfg.tls)]
    if fmt == "json":
        click.echo(json.dumps([_as_dict(c, i == 0) for i, c in enumerate(loaded)],
                              indent=2))
    elif not loaded:
        click.echo("no certificates configured (tls.cert_path, tls.certificates)")
    else:
        click.echo(render_table(loaded))
    sys.exit(EXIT_OK if all(c.ok for c in loaded) else EXIT_UNUSABLE)


def render_table(loaded: list[LoadedCert]) -> str:
    rows = [_row(c, i == 0) for i, c in enumerate(loaded)]
    widths = [max(len(r[i]) for r in [HEADINGS, *rows]) for i in range(len(HEADINGS))]
    lines = [_line(HEADINGS, widths)]
    for cert, row in zip(loaded, rows, strict=True):
        lines.append(_line(row, widths))
        for p in cert.problems:
            kind = "error" if p.fatal else "warning"
            lines.append(f"  {kind}: {p.field} {p.value}: {p.message}")
            lines.append(f"    help: {p.hint}")
    return "\n".join(lines)


def _line(cells, widths) -> str:
    return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()


def _row(cert: LoadedCert, default: bool) -> tuple[str, ...]:
    src = cert.source
    serves = src.hostname or "its names"
    serves = "default" if len(src.where) == 1 else serves + (" (default)" if default else "")
    days = cert.days_left()
    files = f"{src.cert_path}, {src.key_path}"
    return (src.label, serves, ", ".join((*cert.dns_names, *cert.ip_names)) or "-",
            cert.issuer or "-",
            f"{cert.not_after:%Y-%m-%d %H:%M}" if cert.not_after else "-",
            f"{days:.0f}" if days is not None else "-", files)


def _as_dict(cert: LoadedCert, default: bool) -> dict:
    src = cert.source
    days = cert.days_left()
    return {
        "cert": src.label, "hostname": src.hostname, "name": src.name,
        "default": default, "names": [*cert.dns_names, *cert.ip_names],
        "subject": cert.subject, "issuer": cert.issuer,
        "not_before": cert.not_before.isoformat() if cert.not_before else None,
        "not_after": cert.not_after.isoformat() if cert.not_after else None,
        "days_left": round(days, 2) if days is not None else None,
        "cert_path": src.cert_path, "key_path": src.key_path, "usable": cert.ok,
        "problems": [{"severity": "error" if p.fatal else "warning", "field": p.field,
                      "value": p.value, "message": p.message, "hint": p.hint}
                     for p in cert.problems],
    }
