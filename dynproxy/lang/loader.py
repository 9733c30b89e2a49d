"""Read a root rule file (or text), splice its includes in, and return a Program.

Includes are resolved relative to the including file; a glob's matches are taken
in sorted order and a glob that matches nothing is fine (as in nginx), while a
plain path that does not exist is an error. Cycles and repeated includes are
errors. Limits keep hostile input from exhausting memory. Reads files; no network.

Where the files come from is a `files` hook (default: the disk, `DiskFiles`): the
master of a multi-process proxy records what it validated and hands workers a
bundle that answers the same questions, so a worker serves exactly those texts.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from dynproxy.lang import ast
from dynproxy.lang.diagnostics import Diagnostic, RulesError, error, help_, note
from dynproxy.lang.parser import parse_text

MAX_FILE_BYTES = 16 * 1024 * 1024
MAX_RULES = 100_000
MAX_FILES = 1_000


class RuleFiles(Protocol):
    """What the loader asks of the place rule files come from."""

    def read(self, path: Path, limit: int) -> bytes:
        """The file's bytes, at most `limit` + 1 of them; OSError when unreadable."""

    def identity(self, path: Path) -> str:
        """One name per file whatever the path that reaches it (cycle detection)."""

    def glob_files(self, pattern: str) -> list[str]:
        """Regular files matching a glob pattern, sorted."""

    def exists(self, path: str) -> bool: ...


class DiskFiles:
    """Rule files as they are on disk now."""

    def read(self, path: Path, limit: int) -> bytes:
        with open(path, "rb") as file:
            return file.read(limit + 1)

    def identity(self, path: Path) -> str:
        return os.path.realpath(path)

    def glob_files(self, pattern: str) -> list[str]:
        return [m for m in sorted(glob.glob(pattern)) if os.path.isfile(m)]

    def exists(self, path: str) -> bool:
        return os.path.exists(path)


DISK = DiskFiles()


@dataclass
class _State:
    files: RuleFiles = DISK
    sources: dict[str, str] = field(default_factory=dict)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    backends: list[ast.BackendDecl] = field(default_factory=list)
    pools: list[ast.PoolDecl] = field(default_factory=list)
    rules: list[ast.Rule] = field(default_factory=list)
    includes: list[ast.Include] = field(default_factory=list)
    included_at: dict[str, ast.Pos | None] = field(default_factory=dict)
    too_many_rules: bool = False


def load_program(path: str | os.PathLike,
                 files: RuleFiles | None = None) -> tuple[ast.Program, list[Diagnostic]]:
    """Parse `path` and everything it includes; diagnostics cover read/syntax/include errors.
    `files` answers every read (default: the disk)."""
    state = _State(files=files or DISK)
    root = _display(Path(path))
    _load_file(Path(path), None, [], state)
    return _program(root, state), state.diagnostics


def load_program_text(text: str, name: str = "<rules>", base_dir: str | None = None,
                      files: RuleFiles | None = None):
    """Like load_program for text given directly (REPL, tests, embedding)."""
    state = _State(files=files or DISK)
    state.sources[name] = text
    state.included_at[name] = None
    _load_text(text, name, Path(base_dir or "."), [name], state)
    return _program(name, state), state.diagnostics


def load_or_raise(path_or_text) -> ast.Program:
    program, diags = (
        load_program(path_or_text) if _is_path(path_or_text) else load_program_text(path_or_text)
    )
    if any(d.is_error for d in diags):
        raise RulesError(diags, program.sources)
    return program


def _is_path(x) -> bool:
    if isinstance(x, os.PathLike):
        return True
    return isinstance(x, str) and "\n" not in x and "->" not in x and len(x) < 4096


def _program(root: str, s: _State) -> ast.Program:
    return ast.Program(
        root=root,
        backends=tuple(s.backends),
        pools=tuple(s.pools),
        rules=tuple(s.rules),
        includes=tuple(s.includes),
        sources=s.sources,
    )


def _display(path: Path) -> str:
    """Paths as the operator typed them (relative stays relative)."""
    return os.path.normpath(str(path))


def _load_file(path: Path, at: ast.Include | None, stack: list[str], s: _State) -> None:
    name = _display(path)
    key = s.files.identity(path)
    if not _check_include(name, key, at, stack, s):
        return
    text = _read(path, name, at, s)
    if text is None:
        return
    s.sources[name] = text
    s.included_at[key] = at.pos if at else None
    _load_text(text, name, path.parent, stack + [key], s)


def _check_include(name, key, at, stack, s: _State) -> bool:
    if at is None:
        return True
    if key in stack:
        chain = " -> ".join(os.path.relpath(k) for k in stack[stack.index(key):] + [key])
        s.diagnostics.append(error(
            "E111", f"include cycle: {name!r} includes itself", at.pos,
            note(f"the chain is {chain}"),
            help_("remove one of the includes in the chain"),
        ))
        return False
    if key in s.included_at:
        first = s.included_at[key]
        notes = [note("first included here", first)] if first else []
        s.diagnostics.append(error(
            "E112", f"{name!r} is included more than once", at.pos, *notes,
            help_("include each file once; its rules would otherwise appear twice"),
        ))
        return False
    if len(s.included_at) >= MAX_FILES:
        s.diagnostics.append(error("E113", f"more than {MAX_FILES} files included", at.pos))
        return False
    return True


def _read(path: Path, name: str, at: ast.Include | None, s: _State) -> str | None:
    where = at.pos if at else ast.Pos(name, 1, 1, 1, 1)
    try:
        data = s.files.read(path, MAX_FILE_BYTES)
    except OSError as exc:
        what = "cannot read included file" if at else "cannot read rule file"
        s.diagnostics.append(error("E001" if at is None else "E110",
                                   f"{what} {name!r}: {exc.strerror or exc}", where))
        return None
    if len(data) > MAX_FILE_BYTES:
        s.diagnostics.append(error(
            "E001", f"{name!r} is larger than {MAX_FILE_BYTES // 2**20} MiB, the most a "
            "rule file may be", where,
            help_("split it with include, or move per-host routes to Redis (plugin redis_sni)"),
        ))
        return None
    return _decode(data, name, where, s)


def _decode(data: bytes, name: str, where: ast.Pos, s: _State) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        col = exc.start - (before.rfind(b"\n") + 1) + 1
        s.diagnostics.append(error(
            "E001", f"{name!r} is not UTF-8 text: byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}", ast.Pos(name, line, col, line, col + 1),
            help_("rule files must be UTF-8; is this the right file?"),
        ))
        s.sources.setdefault(name, data.decode("utf-8", "replace"))
        return None


def _load_text(text: str, name: str, base: Path, stack: list[str], s: _State) -> None:
    if s.too_many_rules:  # said once already; parsing more files would only cost time
        return
    if _rough_rule_count(text) > MAX_RULES:  # before minutes of parsing
        s.too_many_rules = True
        s.diagnostics.append(error(
            "E102", f"more than {MAX_RULES:,} rules in {name!r}", ast.Pos(name, 1, 1, 1, 1),
            help_("route many host names through Redis (plugin redis_sni) instead of one "
                  "rule each"),
        ))
        return
    try:
        rule_file = parse_text(text, name)
    except RulesError as exc:
        s.diagnostics.extend(exc.diagnostics)
        return
    for item in rule_file.items:
        _add_item(item, base, stack, s)


def _rough_rule_count(text: str) -> int:
    """Lines with an arrow outside a comment: cheap, and never below the real count
    (a rule has exactly one arrow)."""
    if text.count("->") <= MAX_RULES:
        return 0
    return sum(1 for line in text.splitlines() if "->" in line.split("#", 1)[0])


def _add_item(item, base: Path, stack: list[str], s: _State) -> None:
    if isinstance(item, ast.Include):
        s.includes.append(item)
        _expand_include(item, base, stack, s)
    elif isinstance(item, ast.BackendDecl):
        s.backends.append(item)
    elif isinstance(item, ast.PoolDecl):
        s.pools.append(item)
    elif len(s.rules) < MAX_RULES:
        s.rules.append(item)
    elif not s.too_many_rules:
        s.too_many_rules = True
        s.diagnostics.append(error(
            "E102", f"more than {MAX_RULES:,} rules", item.pos,
            help_("route many host names through Redis (plugin redis_sni) instead of one "
                  "rule each"),
        ))


def _expand_include(inc: ast.Include, base: Path, stack: list[str], s: _State) -> None:
    pattern = inc.pattern if os.path.isabs(inc.pattern) else str(base / inc.pattern)
    if glob.has_magic(pattern):
        for match in s.files.glob_files(pattern):
            _load_file(Path(match), inc, stack, s)
        return
    if not s.files.exists(pattern):
        s.diagnostics.append(error(
            "E110", f"included file {inc.pattern!r} does not exist", inc.pos,
            note(f"looked for {os.path.normpath(pattern)!r}, relative to the including file"),
        ))
        return
    _load_file(Path(pattern), inc, stack, s)
