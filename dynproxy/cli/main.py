"""The `dynproxy` command: `run` (the default), `lint`, `repl`, `init`, `backends`, `certs`.

Each subcommand lives in its own module and is imported only when used, so that
`dynproxy lint` starts fast and never imports gevent.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import click

from dynproxy import __version__

# name -> (module, attribute); imported on first use.
COMMANDS = {
    "run": ("dynproxy.cli.run", "run"),
    "lint": ("dynproxy.cli.lint", "lint"),
    "repl": ("dynproxy.cli.repl", "repl"),
    "init": ("dynproxy.cli.init", "init"),
    "backends": ("dynproxy.cli.backends", "backends"),
    "certs": ("dynproxy.cli.certs", "certs"),
    "reload": ("dynproxy.cli.signals", "reload"),
    "stop": ("dynproxy.cli.signals", "stop"),
}


class LazyDefaultGroup(click.Group):
    """Imports subcommands lazily; arguments that name no command go to `run`."""

    def list_commands(self, ctx):
        return [name for name in COMMANDS if self._available(name)]

    def get_command(self, ctx, name):
        if name not in COMMANDS or not self._available(name):
            return None
        module, attr = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def parse_args(self, ctx, args):
        if not args or (args[0] not in COMMANDS and args[0] not in ("--help", "-h", "--version")):
            args = ["run", *args]
        return super().parse_args(ctx, args)

    @staticmethod
    def _available(name: str) -> bool:
        return importlib.util.find_spec(COMMANDS[name][0]) is not None


@click.group(cls=LazyDefaultGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dynproxy")
def cli() -> None:
    """dynproxy: a dynamic Layer-4 proxy steered by rules that read like sentences.

    With no command, `run` is meant: `dynproxy --rules rules/main.rules`.
    """


def main() -> None:
    try:
        cli(prog_name="dynproxy")
    except KeyboardInterrupt:
        sys.exit(130)
