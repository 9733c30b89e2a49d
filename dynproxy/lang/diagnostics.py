"""Compiler-style diagnostics for rule files, and the one error type of the language.

A Diagnostic is a value: severity, code, message, where, and follow-up notes
("note: first declared here", "help: did you mean 'web'?"). Rendering to text (with
the source line and a caret) or JSON happens here. No I/O besides formatting.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass
from typing import Iterable, Mapping

from dynproxy.lang.ast import Pos

ERROR = "error"
WARNING = "warning"


@dataclass(frozen=True, slots=True)
class Note:
    kind: str  # "note" | "help"
    message: str
    pos: Pos | None = None


@dataclass(frozen=True, slots=True)
class Diagnostic:
    severity: str  # ERROR | WARNING
    code: str  # "E100", "W300", ...
    message: str
    pos: Pos
    notes: tuple[Note, ...] = ()

    @property
    def is_error(self) -> bool:
        return self.severity == ERROR

    def to_dict(self) -> dict:
        return {
            "severity": self.severity,
            "code": self.code,
            "message": self.message,
            **_pos_dict(self.pos),
            "notes": [
                {"kind": n.kind, "message": n.message, **(_pos_dict(n.pos) if n.pos else {})}
                for n in self.notes
            ],
        }


def error(code: str, message: str, pos: Pos, *notes: Note) -> Diagnostic:
    return Diagnostic(ERROR, code, message, pos, tuple(notes))


def warning(code: str, message: str, pos: Pos, *notes: Note) -> Diagnostic:
    return Diagnostic(WARNING, code, message, pos, tuple(notes))


def note(message: str, pos: Pos | None = None) -> Note:
    return Note("note", message, pos)


def help_(message: str) -> Note:
    return Note("help", message)


def did_you_mean(name: str, candidates: Iterable[str]) -> Note | None:
    """A `help:` note proposing the closest known name, if one is close enough."""
    close = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return help_(f"did you mean {close[0]!r}?") if close else None


class RulesError(Exception):
    """A rule set that must not be used: carries every diagnostic (errors first)."""

    def __init__(self, diagnostics: Iterable[Diagnostic], sources: Mapping[str, str] | None = None):
        self.diagnostics = tuple(sorted(diagnostics, key=lambda d: (not d.is_error, _order(d))))
        self.sources = dict(sources or {})
        errors = [d for d in self.diagnostics if d.is_error]
        first = errors[0] if errors else self.diagnostics[0]
        more = f" (and {len(errors) - 1} more error(s))" if len(errors) > 1 else ""
        super().__init__(f"{first.pos}: {first.severity}[{first.code}]: {first.message}{more}")

    def render(self) -> str:
        return render_text(self.diagnostics, self.sources)


def _pos_dict(pos: Pos) -> dict:
    return {
        "file": pos.file,
        "line": pos.line,
        "column": pos.col,
        "end_line": pos.end_line,
        "end_column": pos.end_col,
    }


def _order(d: Diagnostic) -> tuple:
    return (d.pos.file, d.pos.line, d.pos.col, d.code)


def sort_diagnostics(diagnostics: Iterable[Diagnostic]) -> list[Diagnostic]:
    return sorted(diagnostics, key=_order)


def render_text(diagnostics: Iterable[Diagnostic], sources: Mapping[str, str]) -> str:
    """`file:line:col: severity[CODE]: message`, the source line, a caret, notes."""
    return "".join(render_one(d, sources) + "\n" for d in diagnostics)


def render_one(d: Diagnostic, sources: Mapping[str, str]) -> str:
    lines = [f"{d.pos}: {d.severity}[{d.code}]: {d.message}"]
    lines += _excerpt(d.pos, sources)
    for n in d.notes:
        where = f"{n.pos}: " if n.pos else ""
        lines.append(f"  = {n.kind}: {where}{n.message}")
        if n.pos and n.kind == "note":
            lines += _excerpt(n.pos, sources)
    return "\n".join(lines)


def _excerpt(pos: Pos, sources: Mapping[str, str]) -> list[str]:
    text = sources.get(pos.file)
    if text is None or pos.line < 1:
        return []
    src_lines = text.splitlines()
    if pos.line > len(src_lines):
        return []
    line = "".join(c if c.isprintable() else "\ufffd" for c in src_lines[pos.line - 1].replace("\t", " "))
    if len(line) > 200:  # keep a huge single-line file readable
        start = max(0, pos.col - 80)
        line, col = line[start : start + 200], pos.col - start
    else:
        col = pos.col
    width = pos.end_col - pos.col if pos.end_line == pos.line and pos.end_col > pos.col else 1
    width = max(1, min(width, len(line) - col + 2))
    gutter = str(pos.line)
    pad = " " * len(gutter)
    return [f"{pad} |", f"{gutter} | {line}", f"{pad} | {' ' * (col - 1)}{'^' * width}"]


def render_json(diagnostics: Iterable[Diagnostic]) -> str:
    diags = [d.to_dict() for d in diagnostics]
    summary = {
        "errors": sum(d["severity"] == ERROR for d in diags),
        "warnings": sum(d["severity"] == WARNING for d in diags),
    }
    return json.dumps({"diagnostics": diags, **summary}, indent=2)
