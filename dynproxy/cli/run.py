"""`dynproxy run` (the default command): load, validate, bind, serve until told to stop.

The process this runs in becomes the master (proc.master); it starts the workers.
"""

from gevent import monkey

monkey.patch_all()

import sys  # noqa: E402

import click  # noqa: E402

from dynproxy.cli.number_args import WholeNumber  # noqa: E402
from dynproxy.core.config import ConfigError  # noqa: E402
from dynproxy.lang.diagnostics import RulesError  # noqa: E402


def _binds(values) -> list:
    """`--udp-bind none` means no listener of that kind."""
    return [] if list(values) == ["none"] else list(values)


def _overrides(tcp_bind, udp_bind, metrics_bind, log_level, workers, pid_file) -> dict:
    out: dict = {}
    if tcp_bind:
        out["server.tcp_bind"] = _binds(tcp_bind)
    if udp_bind:
        out["server.udp_bind"] = _binds(udp_bind)
    if metrics_bind:
        out["monitoring.metrics_bind"] = metrics_bind
    if log_level:
        out["monitoring.log_level"] = log_level
    if workers is not None:
        out["server.workers"] = workers
    if pid_file:
        out["server.pid_file"] = pid_file
    return out


@click.command()
@click.option("--rules", "rules_path", default="rules/main.rules", show_default=True,
              type=click.Path(dir_okay=False), help="Rule file to serve.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="YAML config; without it the built-in defaults serve.")
@click.option("--tcp-bind", multiple=True, metavar="HOST:PORT|none",
              help="TCP listener (repeatable; 'none' for no TCP); replaces server.tcp_bind.")
@click.option("--udp-bind", multiple=True, metavar="HOST:PORT|none",
              help="UDP listener (repeatable; 'none' for no UDP); replaces server.udp_bind.")
@click.option("--metrics-bind", metavar="HOST:PORT", help="Address of /metrics and /healthz.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]))
@click.option("--workers", type=WholeNumber("a number of workers", 0, 1024, "--workers 4",
                                            "0: one per CPU"),
              help="Worker processes (0: one per CPU); replaces server.workers.")
@click.option("--pid-file", type=click.Path(dir_okay=False),
              help="Write the master's pid here (for `dynproxy reload|stop`); "
                   "replaces server.pid_file.")
def run(rules_path, config_path, tcp_bind, udp_bind, metrics_bind, log_level, workers,
        pid_file):
    """Run the proxy: dynproxy --rules rules/main.rules [--config config/dynproxy.yaml].

    \b
    Signals to the master (pid in server.pid_file, or `dynproxy reload|stop`):
      SIGTERM, SIGINT  graceful stop: drain up to shutdown.drain_timeout (twice: fast)
      SIGQUIT          fast stop, within a second
      SIGHUP           reload rules, config and certificates without dropping a connection
    """
    from dynproxy.proc.build import Sources
    from dynproxy.proc.main import serve_main

    try:
        src = Sources(rules_path, config_path,
                      _overrides(tcp_bind, udp_bind, metrics_bind, log_level, workers,
                                 pid_file))
        code = serve_main(src)
    except RulesError as exc:
        click.echo(exc.render(), err=True, nl=False)
        click.echo(f"dynproxy: not starting: {rules_path} has errors (see above)", err=True)
        sys.exit(2)
    except ConfigError as exc:
        click.echo(f"dynproxy: not starting: {exc}", err=True)
        sys.exit(2)
    sys.exit(code)
