"""The rule language: parse -> AST -> lint -> compile. Public API for embedding and tests.

    >>> rules = dynproxy.lang.load('sni suffix ".example.com" -> forward(a)\\n'
    ...                            'backend a 127.0.0.1:9001')
    >>> d = rules.decide(proto="tcp", src="10.1.2.3", dport=443, sni="api.example.com")
    >>> d.action, d.targets[0].name, d.rule.line
    ('forward', 'a', 1)

`load(path_or_text)` raises RulesError carrying every diagnostic when the rules
have errors; warnings are kept on `RuleSet.diagnostics`. No I/O besides reading
the rule files.
"""

from __future__ import annotations

import os

from dynproxy.core.decision import NO_MATCH, Decision
from dynproxy.core.router import ConnInfo
from dynproxy.lang import ast
from dynproxy.lang.compile import Compiled, compile_program
from dynproxy.lang.diagnostics import Diagnostic, RulesError
from dynproxy.lang.loader import load_program, load_program_text
from dynproxy.lang.values import normalize_sni

__all__ = ["load", "load_file", "load_text", "build", "RuleSet", "RulesError", "Decision", "ConnInfo"]


class RuleSet:
    """A compiled, lint-clean rule set. Immutable; a reload builds a new one."""

    def __init__(self, program: ast.Program, compiled: Compiled, diagnostics: list[Diagnostic]):
        self.program = program
        self.diagnostics = tuple(diagnostics)  # warnings only
        self.router = compiled.router
        self.decisions = compiled.decisions
        self.backends = compiled.backends
        self.pools = compiled.pools
        self._clause_rule = tuple(c.rule for c in compiled.router.clauses)

    @property
    def rules(self) -> tuple[ast.Rule, ...]:
        return self.program.rules

    def decide(self, proto: str = "tcp", src: str | None = None, dport: int | None = None,
               sni: str | None = None, alpn=(), *, start: int = 0) -> Decision:
        """Route a connection described by its facts (SNI is normalised here)."""
        conn = ConnInfo(proto, src, dport, normalize_sni(sni) if sni else None, tuple(alpn))
        return self.decide_conn(conn, start)

    def decide_conn(self, conn: ConnInfo, start: int = 0) -> Decision:
        """The hot path: `conn.sni` must already be normalised (the ClientHello parser does)."""
        clause = self.router.first_clause(conn, start)
        if clause is None:
            return NO_MATCH
        return self.decisions[self._clause_rule[clause]]


def load(path_or_text, *, plugins=None, certificates=None, health_defaults=None) -> RuleSet:
    """A RuleSet from a path (PathLike, or a one-line str without `->`) or rule text."""
    if isinstance(path_or_text, os.PathLike) or (
        isinstance(path_or_text, str) and "\n" not in path_or_text and "->" not in path_or_text
    ):  # rule text always has an arrow; anything else is a path (missing: "cannot read")
        return load_file(path_or_text, plugins=plugins, certificates=certificates,
                         health_defaults=health_defaults)
    return load_text(path_or_text, plugins=plugins, certificates=certificates,
                     health_defaults=health_defaults)


def load_file(path, **kw) -> RuleSet:
    program, diags = load_program(path)
    return build(program, diags, **kw)


def load_text(text: str, name: str = "<rules>", base_dir: str | None = None, **kw) -> RuleSet:
    program, diags = load_program_text(text, name, base_dir)
    return build(program, diags, **kw)


def build(program, diags, *, plugins=None, certificates=None, health_defaults=None) -> RuleSet:
    """Lint and compile an already loaded program (loader diagnostics in `diags`)."""
    if not any(d.is_error for d in diags):
        diags = list(diags) + _lint(program, plugins, certificates)
    if any(d.is_error for d in diags):
        raise RulesError(diags, program.sources)
    return RuleSet(program, compile_program(program, health_defaults), diags)


def _lint(program, plugins, certificates) -> list[Diagnostic]:
    from dynproxy.lang.lint import BUILTIN_PLUGINS, lint_program

    names = BUILTIN_PLUGINS | frozenset(plugins or ())
    return lint_program(program, plugins=names, certificates=certificates)
