"""The REPL's state: the rule file, the session's own edits, and the rule set they make.

Rules added in the session live in a virtual file `<session>` (one line each, never
renumbered, so diagnostics and decisions point at `<session>:N`). Edits are kept as
a list of operations (add before a rule, drop a rule) that names rules by identity,
not by number, so they still apply after `:reload` re-reads a changed file. Every
change rebuilds the rule set off to the side (parse, lint, compile) and swaps it in
only when it is clean: a bad rule or a broken file changes nothing.

Reads the rule files; no terminal, no network.
"""

from __future__ import annotations

import difflib
import ipaddress
from dataclasses import dataclass, replace

from dynproxy.core.router import ConnInfo
from dynproxy.lang import RuleSet, ast, build
from dynproxy.lang.diagnostics import RulesError
from dynproxy.lang.loader import load_program
from dynproxy.lang.parser import parse_text
from dynproxy.lang.values import normalize_sni

SESSION = "<session>"
QUERY_KEYS = ("sni", "src", "dport", "proto", "alpn")


class SessionError(Exception):
    """A command the session cannot carry out; the message says why and what to do."""


@dataclass(frozen=True, slots=True)
class AddRule:
    line: int  # line of <session> holding the rule
    before: tuple | None  # rule_key of the rule it goes before; None: the end


@dataclass(frozen=True, slots=True)
class DropRule:
    key: tuple  # rule_key of the dropped rule
    label: str  # how to name it if it is gone


def rule_key(rules, index: int) -> tuple:
    """Rule `index`'s identity across reloads: its text in a file (and which copy of
    that text, should the file repeat it), its line in the session."""
    rule = rules[index]
    if rule.pos.file == SESSION:
        return (SESSION, rule.pos.line, 0)
    copies = sum(1 for r in rules[:index] if r.pos.file == rule.pos.file and r.text == rule.text)
    return (rule.pos.file, rule.text, copies)


class Session:
    """The rule file plus session edits; `ruleset` is always a clean, compiled rule set."""

    def __init__(self, path: str, plugins: tuple[str, ...] = ()):
        self.path = path
        self.plugins = plugins
        self.lines: list[str] = []  # the text of <session>, one added rule per line
        self._parsed: dict[int, ast.Rule] = {}
        self.edits: list[AddRule | DropRule] = []
        self._file = self._read_file()  # the file's program as last read cleanly
        self.ruleset, _ = self._build(self._file, self.edits)

    @property
    def rules(self) -> tuple[ast.Rule, ...]:
        return self.ruleset.rules

    # edits -------------------------------------------------------------------------
    def add(self, text: str, before: int | None = None) -> list[str]:
        """Add one rule (before rule number `before`, or at the end); returns notes."""
        anchor = rule_key(self.rules, self.number(before) - 1) if before is not None else None
        line = len(self.lines) + 1
        self.lines.append(text)
        try:
            self._parsed[line] = self._parse_line(text, line)
            return self._apply([*self.edits, AddRule(line, anchor)])
        except (RulesError, SessionError):
            self.lines.pop()
            self._parsed.pop(line, None)
            raise

    def drop(self, number: int) -> list[str]:
        index = self.number(number) - 1
        label = describe_rule(number, self.rules[index])
        return self._apply([*self.edits, DropRule(rule_key(self.rules, index), label)])

    def reload(self) -> list[str]:
        """Re-read the file from disk, keep the session's edits; raises RulesError if bad."""
        file = self._read_file()
        self.ruleset, notes = self._build(file, self.edits)
        self._file = file
        return notes

    def number(self, number: int) -> int:
        """`number` if it names a rule (1-based), else a SessionError saying which do."""
        count = len(self.rules)
        if not 1 <= number <= count:
            span = f"are 1..{count}" if count else "none: the rule set is empty"
            raise SessionError(f"there is no rule {number}; rule numbers {span} (:rules)")
        return number

    # building ----------------------------------------------------------------------
    def _apply(self, edits: list) -> list[str]:
        ruleset, notes = self._build(self._file, edits)
        self.edits, self.ruleset = edits, ruleset
        return notes

    def _read_file(self) -> tuple[ast.Program, list]:
        program, diagnostics = load_program(self.path)
        if any(d.is_error for d in diagnostics):
            raise RulesError(diagnostics, program.sources)
        return program, diagnostics

    def _build(self, file, edits) -> tuple[RuleSet, list[str]]:
        """Lint and compile the file's program with `edits` applied; RulesError if bad."""
        program, diagnostics = file
        rules, notes = apply_edits(program.rules, edits, self._parsed)
        sources = {**program.sources, SESSION: self.session_text()}
        combined = replace(program, rules=tuple(rules), sources=sources)
        return build(combined, diagnostics, plugins=self.plugins), notes

    def session_text(self) -> str:
        return "".join(line + "\n" for line in self.lines)

    def _parse_line(self, text: str, line: int) -> ast.Rule:
        # Blank lines in front put the rule on its own line of <session>.
        items = parse_text("\n" * (line - 1) + text, SESSION).items
        rules = [i for i in items if isinstance(i, ast.Rule)]
        if len(items) != 1 or len(rules) != 1:
            what = "nothing" if not items else f"{len(items)} items" if len(items) > 1 else \
                "a declaration"
            raise SessionError(f"`:add` takes exactly one rule, got {what}; backends, pools "
                               "and includes belong in the rule file (then :reload)")
        return rules[0]


def apply_edits(file_rules, edits, parsed: dict[int, ast.Rule]) -> tuple[list, list[str]]:
    """The file's rules with the session's edits replayed; notes for edits that moved."""
    rules, notes = list(file_rules), []
    for edit in edits:
        if isinstance(edit, AddRule):
            at = _find(rules, edit.before) if edit.before else len(rules)
            if at is None:
                notes.append(f"<session>:{edit.line}: the rule it was added before is gone "
                             "from the file; it now stands at the end")
                at = len(rules)
            rules.insert(at, parsed[edit.line])
            continue
        at = _find(rules, edit.key)
        if at is None:
            notes.append(f"{edit.label} (dropped in this session) is no longer in the file")
        else:
            del rules[at]
    return rules, notes


def _find(rules: list[ast.Rule], key: tuple) -> int | None:
    file, ident, copy = key
    for i, r in enumerate(rules):
        if r.pos.file == file and (r.pos.line if file == SESSION else r.text) == ident:
            if copy == 0:
                return i
            copy -= 1
    return None


def describe_rule(number: int, rule: ast.Rule) -> str:
    return f"#{number} {rule.pos.file}:{rule.pos.line}: {' '.join(rule.text.split())}"


# --- queries --------------------------------------------------------------------------


def parse_query(line: str) -> ConnInfo:
    """`sni=api.example.com src=10.1.2.3 dport=443 proto=tcp alpn=h2,http/1.1` -> ConnInfo."""
    facts: dict[str, object] = {}
    for word in line.split():
        key, eq, value = word.partition("=")
        if not eq:
            raise SessionError(f"{_short(word)} is not KEY=VALUE; a query looks like "
                               "`sni=api.example.com dport=443` (:help)")
        if key not in QUERY_KEYS:
            raise SessionError(f"unknown key {_short(key)}{_did_you_mean(key)}; keys are "
                               + ", ".join(k + "=" for k in QUERY_KEYS))
        if key in facts:
            raise SessionError(f"{key}= is given twice")
        if not value:
            raise SessionError(f"{key}= has no value; leave {key}= out if the connection "
                               "has none")
        facts[key] = QUERY_VALUES[key](value)
    return _conn(facts)


def _conn(facts: dict) -> ConnInfo:
    proto = facts.get("proto", "tcp")
    if proto == "udp" and ("sni" in facts or "alpn" in facts):
        raise SessionError("UDP datagrams carry no SNI or ALPN; drop sni=/alpn= or use "
                           "proto=tcp")
    return ConnInfo(proto, facts.get("src"), facts.get("dport"), facts.get("sni"),
                    facts.get("alpn", ()))


def _sni(value: str) -> str:
    try:
        return normalize_sni(value)
    except ValueError as exc:
        raise SessionError(f"sni={_short(value)}: {exc}") from None


def _src(value: str) -> str:
    try:
        ipaddress.ip_address(value.split("%", 1)[0])
    except ValueError:
        raise SessionError(f"src={_short(value)} is not an IP address; write e.g. "
                           "src=10.1.2.3 or src=2001:db8::1 (no port)") from None
    return value


def _dport(value: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
        raise SessionError(f"dport={_short(value)} is not a port; write a number in 1..65535")
    return int(value)


def _proto(value: str) -> str:
    if value not in ("tcp", "udp"):
        raise SessionError(f"proto={_short(value)}: write proto=tcp or proto=udp")
    return value


def _alpn(value: str) -> tuple[str, ...]:
    protocols = tuple(p for p in value.split(",") if p)
    if not protocols:
        raise SessionError(f"alpn={_short(value)} names no protocol; write e.g. alpn=h2,http/1.1")
    return protocols


QUERY_VALUES = {"sni": _sni, "src": _src, "dport": _dport, "proto": _proto, "alpn": _alpn}


def _did_you_mean(key: str) -> str:
    close = difflib.get_close_matches(key.lower(), QUERY_KEYS, n=1, cutoff=0.5)
    return f" (did you mean {close[0]}=?)" if close else ""


def _short(value: str, limit: int = 60) -> str:
    """repr of a value, cut so that a pasted megabyte stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"
