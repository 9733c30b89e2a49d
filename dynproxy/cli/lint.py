"""`dynproxy lint FILE... [--format text|json] [--strict] [--config FILE]`.

Prints compiler-style diagnostics (or JSON) for each rule file and exits 0 when
clean, 2 on any error, 1 on warnings with --strict. Whatever the input, it ends with
diagnostics and an exit code, never a traceback. With --config, the plugin and
certificate names the rules may use are read from the config file (only those two
lists; the config schema itself is validated elsewhere). Imports no gevent.
"""

from __future__ import annotations

import sys
from collections import Counter

import click

from dynproxy.lang.ast import Pos
from dynproxy.lang.diagnostics import Diagnostic, error, render_json, render_one
from dynproxy.lang.lint import BUILTIN_PLUGINS, internal_error, lint_path

EXIT_CLEAN, EXIT_WARNINGS, EXIT_ERRORS = 0, 1, 2
MAX_SHOWN_PER_CODE = 100  # a million identical warnings help nobody; counts stay exact


@click.command()
@click.argument("files", nargs=-1, required=True)
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text",
              show_default=True, help="Output format; json is meant for CI.")
@click.option("--strict", is_flag=True, help="Exit 1 when there are warnings (errors exit 2).")
@click.option("--config", "config_path", metavar="FILE",
              help="dynproxy config: the plugin and certificate names it declares are known.")
def lint(files: tuple[str, ...], fmt: str, strict: bool, config_path: str | None) -> None:
    """Check rule files: syntax, names, values, unreachable and overlapping rules."""
    try:
        code = run_lint(files, fmt, strict, config_path)
    except Exception as exc:  # last resort: never a traceback
        click.echo(render_one(internal_error(files[0] if files else "<lint>", exc), {}))
        code = EXIT_ERRORS
    sys.exit(code)


def run_lint(files, fmt: str, strict: bool, config_path: str | None) -> int:
    known, config_diags, config_sources = load_names(config_path)
    results = [(config_path, config_diags, config_sources)] if config_diags else []
    for path in files:
        diags, sources = lint_path(path, **known)
        results.append((path, diags, sources))
    everything = [d for _, diags, _ in results for d in diags]
    if fmt == "json":
        click.echo(render_json(everything))
    else:
        for path, diags, sources in results:
            click.echo(render_file(path, diags, sources), nl=False)
    return exit_code(everything, strict)


def exit_code(diags: list[Diagnostic], strict: bool) -> int:
    if any(d.is_error for d in diags):
        return EXIT_ERRORS
    return EXIT_WARNINGS if strict and diags else EXIT_CLEAN


def render_file(path: str, diags: list[Diagnostic], sources: dict[str, str]) -> str:
    """The diagnostics of one root file, then `path: N errors, M warnings` or `path: ok`."""
    shown: Counter = Counter()
    parts = []
    for d in diags:
        shown[d.code] += 1
        if shown[d.code] <= MAX_SHOWN_PER_CODE:
            parts.append(render_one(d, sources) + "\n")
    for code, count in sorted(shown.items()):
        if count > MAX_SHOWN_PER_CODE:
            parts.append(f"... and {count - MAX_SHOWN_PER_CODE} more [{code}] diagnostics "
                         "not shown\n")
    parts.append(summary(path, diags) + "\n")
    return "".join(parts)


def summary(path: str, diags: list[Diagnostic]) -> str:
    errors = sum(d.is_error for d in diags)
    warnings = len(diags) - errors
    counts = [_plural(errors, "error"), _plural(warnings, "warning")]
    said = ", ".join(c for c in counts if c)
    return f"{path}: {said or 'ok'}"


def _plural(n: int, word: str) -> str:
    return "" if n == 0 else f"{n} {word}" if n == 1 else f"{n} {word}s"


# --- the names a config declares -------------------------------------------------


def _known_plugins() -> frozenset[str]:
    """Built-in plugins and those installed under the `dynproxy.plugins` entry point."""
    from dynproxy.net.plugins import entry_point_names

    return BUILTIN_PLUGINS | frozenset(entry_point_names())


def load_names(config_path: str | None):
    """({plugins=..., certificates=...}, diagnostics, sources) from the config file."""
    if config_path is None:
        return {"plugins": _known_plugins(), "certificates": None}, [], {}
    import yaml

    where = Pos(config_path, 1, 1, 1, 1)
    try:
        with open(config_path, encoding="utf-8") as f:
            text = f.read()
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as exc:
        return _no_names(error("E001", f"cannot read config {config_path!r}: {exc}", where))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        pos = Pos(config_path, mark.line + 1, mark.column + 1, mark.line + 1, mark.column + 2) \
            if mark else where
        problem = getattr(exc, "problem", None) or str(exc)
        return _no_names(error("E001", f"config {config_path!r} is not valid YAML: {problem}",
                               pos), {config_path: text})
    return _names_from(data, config_path, where, text)


def _names_from(data, config_path: str, where: Pos, text: str):
    data = data if isinstance(data, dict) else {}
    plugins = _named(data.get("plugins"))
    tls = data.get("tls") if isinstance(data.get("tls"), dict) else {}
    certs = _named(tls.get("certificates"))
    if plugins is None or certs is None:
        bad = "plugins" if plugins is None else "tls.certificates"
        return _no_names(error("E001", f"config {config_path!r}: `{bad}` must be a list of "
                               "mappings with a `name`", where), {config_path: text})
    return {"plugins": _known_plugins() | plugins, "certificates": certs}, [], {}


def _named(entries) -> frozenset[str] | None:
    if entries is None:
        return frozenset()
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        return None
    return frozenset(str(e["name"]) for e in entries if e.get("name") is not None)


def _no_names(diag: Diagnostic, sources: dict[str, str] | None = None):
    return {"plugins": _known_plugins(), "certificates": None}, [diag], sources or {}
