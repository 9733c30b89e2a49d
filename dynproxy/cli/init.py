"""`dynproxy init [DIR]`: write a starter config and rule file (never overwrites without --force)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

STARTER_RULES = """\
# dynproxy rules: the first rule that matches decides (see docs/rules.md).
# Check this file with `dynproxy lint rules/main.rules`, try it with
# `dynproxy repl --rules rules/main.rules`, reload a running proxy with `dynproxy reload`.

backend app-1 127.0.0.1:9001
backend app-2 127.0.0.1:9002

pool app {
    member app-1 weight 2
    member app-2
    health tcp every 2s timeout 1s rise 2 fall 3
}

# TLS passthrough by SNI: the backend terminates TLS itself.
sni suffix ".example.com" -> forward(app)

# UDP datagrams to any listener port go to app-1.
proto udp -> forward(app-1)

# Everything else (plain TCP, TLS without SNI) goes to the pool too.
default -> forward(app)
"""


@click.command()
@click.argument("directory", default=".", type=click.Path(file_okay=False))
@click.option("--force", is_flag=True, help="Overwrite existing files.")
def init(directory: str, force: bool) -> None:
    """Write DIR/config/dynproxy.yaml and DIR/rules/main.rules to start from."""
    from dynproxy.core.config import render_example

    root = Path(directory)
    files = {root / "config" / "dynproxy.yaml": render_example(),
             root / "rules" / "main.rules": STARTER_RULES}
    existing = [str(p) for p in files if p.exists()]
    if existing and not force:
        click.echo(f"dynproxy init: not overwriting {', '.join(existing)} (use --force)",
                   err=True)
        sys.exit(1)
    for path, text in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        click.echo(f"wrote {path}")
    rules, cfg = root / "rules" / "main.rules", root / "config" / "dynproxy.yaml"
    click.echo(f"next: dynproxy lint {rules} && dynproxy --rules {rules} --config {cfg}")
