"""The linter's entry points: every check on a loaded program, or on files by path.

`lint_program` runs the name/value checks (lang.checks) and the reachability and
overlap analysis (lang.analysis) and returns diagnostics sorted by position.
`lint_path` also loads the file; it never raises: an unexpected failure becomes an
E999 diagnostic, so the CLI and a reloading proxy always get an answer. Reads rule
files (through lang.loader); no network.
"""

from __future__ import annotations

import os
from typing import Iterable

from dynproxy.lang import ast
from dynproxy.lang.analysis import analyze
from dynproxy.lang.checks import check_program
from dynproxy.lang.diagnostics import Diagnostic, error, help_, sort_diagnostics
from dynproxy.lang.loader import load_program

BUILTIN_PLUGINS = frozenset({"redis_sni"})


def lint_program(
    program: ast.Program,
    *,
    plugins: frozenset[str] = BUILTIN_PLUGINS,
    certificates: frozenset[str] | None = None,
) -> list[Diagnostic]:
    """Every semantic diagnostic for `program`, sorted by position.

    `plugins` are the plugin names rules may call; `certificates` the names
    `terminate tls cert NAME` may use (None: not known, so not checked).
    """
    checked = check_program(program, plugins=plugins, certificates=certificates)
    found = checked.diagnostics + analyze(program, skip=checked.broken_rules)
    return sort_diagnostics(found + _no_rules(program))


def _no_rules(program: ast.Program) -> list[Diagnostic]:
    """A file with no rule at all rejects everything: far more often a truncated file
    (a shell `>` mistake) than a wish, so it must be said, not served."""
    if program.rules:
        return []
    return [error("E219", "there are no rules: every connection would be rejected",
                  ast.Pos(program.root, 1, 1, 1, 1),
                  help_("write `default -> reject` if rejecting everything is what you mean"))]


def lint_path(path: str | os.PathLike, **kw) -> tuple[list[Diagnostic], dict[str, str]]:
    """Load and lint one root file: (diagnostics sorted by position, sources read).

    When loading fails (syntax, includes, unreadable) only those diagnostics are
    returned: semantic checks on half a program would mislead.
    """
    name = os.path.normpath(str(path))
    sources: dict[str, str] = {}
    try:
        program, diags = load_program(path)
        sources = program.sources
        if any(d.is_error for d in diags):
            return sort_diagnostics(diags), sources
        return sort_diagnostics(diags + lint_program(program, **kw)), sources
    except RecursionError:
        return [_too_deep(name)], sources
    except Exception as exc:  # the linter must answer, whatever the input
        return [internal_error(name, exc)], sources


def lint_paths(paths: Iterable[str | os.PathLike], **kw) -> tuple[list[Diagnostic], dict[str, str]]:
    """lint_path for each path; diagnostics concatenated in path order, sources merged."""
    all_diags: list[Diagnostic] = []
    all_sources: dict[str, str] = {}
    for path in paths:
        diags, sources = lint_path(path, **kw)
        all_diags += diags
        all_sources.update(sources)
    return all_diags, all_sources


def internal_error(name: str, exc: BaseException) -> Diagnostic:
    return error(
        "E999", f"internal error while linting: {type(exc).__name__}: {exc}"[:300],
        ast.Pos(name, 1, 1, 1, 1),
        help_("this is a bug in dynproxy, not in the rule file; please report it with the file"),
    )


def _too_deep(name: str) -> Diagnostic:
    return error(
        "E101", "the rules are nested too deeply to read (for example a long chain of `not`)",
        ast.Pos(name, 1, 1, 1, 1),
        help_("flatten the condition: `not not x` is `x`"),
    )
