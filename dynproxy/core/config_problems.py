"""What can be wrong with a configuration, and where: the one error type of the config.

A ConfigProblem names the dotted key, the offending value (a bounded repr), the form
that was expected, the file, line and column when known, and a hint ("did you mean
'timeouts'?"). ConfigError carries every problem found, never just the first.
ProblemCollector is what the schema reports into while it validates; it knows where
each key and value sits in the YAML text (MarkTable) so problems point at the source.

Must never do I/O nor import gevent, socket, ssl or redis.
"""

from __future__ import annotations

import difflib
import reprlib
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = [
    "ConfigError",
    "ConfigProblem",
    "Mark",
    "MarkTable",
    "Path",
    "ProblemCollector",
    "dotted",
    "short_repr",
]

# A place in the config tree: ("server", "udp_bind", 0, "bind").
Path = tuple[str | int, ...]

_REPR = reprlib.Repr()
_REPR.maxstring = 80
_REPR.maxother = 80
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = 6
_REPR.maxlevel = 3


def short_repr(value: object) -> str:
    """repr() bounded in size, so an absurd value cannot flood the error message."""
    return _REPR.repr(value)


def dotted(path: Path) -> str:
    """("server", "udp_bind", 0, "bind") -> "server.udp_bind[0].bind"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass(frozen=True, slots=True)
class Mark:
    """A position in the YAML text; line and column count from 1."""

    line: int
    column: int


@dataclass(slots=True)
class MarkTable:
    """Where each value (and each mapping key) of a YAML document starts."""

    values: dict[Path, Mark] = field(default_factory=dict)
    keys: dict[Path, Mark] = field(default_factory=dict)

    def find(self, at: Path, *, key: bool = False) -> Mark | None:
        """The mark of `at`, else of its nearest ancestor that has one."""
        if key and at in self.keys:
            return self.keys[at]
        while True:
            if at in self.values:
                return self.values[at]
            if not at:
                return None
            at = at[:-1]


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a configuration, with enough context to fix it."""

    source: str  # file name, "<config>", or "command line"
    line: int | None
    column: int | None
    key: str  # dotted key; "" for the document as a whole
    what: str  # "invalid value", "unknown key", "missing key", "invalid YAML", ...
    value: str | None  # repr of the offending value, None when there is none
    expected: str
    hint: str | None = None
    detail: str | None = None  # what exactly is wrong with the value, when known

    def where(self) -> str:
        if self.line is None:
            return self.source
        return f"{self.source}:{self.line}:{self.column}"

    def __str__(self) -> str:
        subject = f"{self.key}: {self.what}" if self.key else self.what
        if self.value is not None:
            subject += f" {self.value}"
        if self.detail:
            subject += f" ({self.detail})"
        text = f"{self.where()}: {subject}; expected {self.expected}"
        return f"{text}\n  help: {self.hint}" if self.hint else text


class ConfigError(Exception):
    """The configuration cannot be used; `problems` lists everything wrong with it."""

    def __init__(self, problems: Iterable[ConfigProblem]) -> None:
        self.problems: tuple[ConfigProblem, ...] = tuple(problems)
        super().__init__(self.render())

    def render(self) -> str:
        count = len(self.problems)
        heading = f"invalid configuration ({count} problem{'s' if count != 1 else ''}):"
        return "\n".join([heading, *(str(problem) for problem in self.problems)])


class ProblemCollector:
    """Collects problems during validation and places each one in its source.

    Paths under one of `override_paths` came from overrides (CLI flags), so their
    problems name `override_source` rather than a line of the file.
    """

    def __init__(
        self,
        source: str,
        marks: MarkTable | None = None,
        *,
        override_paths: Iterable[Path] = (),
        override_source: str = "command line",
        known_keys: Iterable[str] = (),
    ) -> None:
        self.source = source
        self.marks = marks or MarkTable()
        self.override_paths = frozenset(override_paths)
        self.override_source = override_source
        self.known_keys = tuple(known_keys)  # every dotted setting name, for hints
        self.problems: list[ConfigProblem] = []
        self._problem_paths: list[Path] = []

    def invalid(self, at: Path, shown: str, expected: str, *, reason: str | None = None,
                hint: str | None = None) -> None:
        self.add(at, "invalid value", shown, expected, hint, detail=reason)

    def missing(self, at: Path, expected: str) -> None:
        self.add(at, "missing required key", None, expected, None)

    def unknown_key(self, at: Path, known_here: Iterable[str]) -> None:
        known = sorted(known_here)
        expected = "one of " + ", ".join(known) if known else "no keys here"
        self.add(at, "unknown key", None, expected, self._suggest(str(at[-1]), known),
                 key_mark=True)

    def add(self, at: Path, what: str, shown: str | None, expected: str,
            hint: str | None, *, key_mark: bool = False, detail: str | None = None) -> None:
        source, mark = self._locate(at, key_mark)
        self._problem_paths.append(at)
        self.problems.append(ConfigProblem(
            source, mark.line if mark else None, mark.column if mark else None,
            dotted(at), what, shown, expected, hint, detail))

    def sorted_problems(self) -> list[ConfigProblem]:
        """Problems in file order; those without a line (overrides) last."""
        return sorted(self.problems, key=lambda p: (p.line is None, p.line or 0, p.column or 0))

    def has_problems_under(self, prefixes: Iterable[Path]) -> bool:
        return any(path[: len(prefix)] == prefix
                   for path in self._problem_paths for prefix in prefixes)

    def _locate(self, at: Path, key_mark: bool) -> tuple[str, Mark | None]:
        if any(at[: len(o)] == o for o in self.override_paths):
            return self.override_source, None
        return self.source, self.marks.find(at, key=key_mark)

    def _suggest(self, name: str, known_here: list[str]) -> str | None:
        close = difflib.get_close_matches(name, known_here, n=1, cutoff=0.6)
        if close:
            return f"did you mean {close[0]!r}?"
        elsewhere = [k for k in self.known_keys if k.rsplit(".", 1)[-1] == name]
        if elsewhere:
            return f"{name!r} belongs elsewhere: did you mean {elsewhere[0]!r}?"
        return None
