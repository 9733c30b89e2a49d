"""`dynproxy run` (the default command): load, validate, bind, serve until told to stop."""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import click  # noqa: E402

from dynproxy.core.config import ConfigError  # noqa: E402
from dynproxy.lang.diagnostics import RulesError  # noqa: E402


def _overrides(tcp_bind, udp_bind, metrics_bind, log_level, workers) -> dict:
    out: dict = {}
    if tcp_bind:
        out["server.tcp_bind"] = list(tcp_bind)
    if udp_bind:
        out["server.udp_bind"] = list(udp_bind)
    if metrics_bind:
        out["monitoring.metrics_bind"] = metrics_bind
    if log_level:
        out["monitoring.log_level"] = log_level
    if workers is not None:
        out["server.workers"] = workers
    return out


@click.command()
@click.option("--rules", "rules_path", default="rules/main.rules", show_default=True,
              type=click.Path(dir_okay=False), help="Rule file to serve.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config; without it the built-in defaults serve.")
@click.option("--tcp-bind", multiple=True, metavar="HOST:PORT",
              help="TCP listener (repeatable); replaces server.tcp_bind.")
@click.option("--udp-bind", multiple=True, metavar="HOST:PORT",
              help="UDP listener (repeatable); replaces server.udp_bind.")
@click.option("--metrics-bind", metavar="HOST:PORT", help="Address of /metrics and /healthz.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--workers", type=int, help="Worker processes (0: one per CPU).")
def run(rules_path, config_path, tcp_bind, udp_bind, metrics_bind, log_level, workers):
    """Run the proxy: dynproxy --rules rules/main.rules [--config config/dynproxy.yaml]."""
    from dynproxy.proc.build import Sources
    from dynproxy.proc.main import serve_main

    src = Sources(rules_path, config_path,
                  _overrides(tcp_bind, udp_bind, metrics_bind, log_level, workers))
    try:
        code = serve_main(src)
    except RulesError as exc:
        click.echo(exc.render(), err=True, nl=False)
        click.echo(f"dynproxy: not starting: {rules_path} has errors (see above)", err=True)
        sys.exit(2)
    except ConfigError as exc:
        click.echo(f"dynproxy: not starting: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)
