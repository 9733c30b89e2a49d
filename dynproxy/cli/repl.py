"""`dynproxy repl --rules FILE`: ask "where does this connection go?" and try rule edits.

On a terminal: a prompt, readline history in ~/.dynproxy_history and tab completion.
Otherwise (a pipe or a file): no prompt and no banner, one answer block per query
line with a blank line between answers, `#` comments and blank lines skipped, so it
can be scripted and tested. A script exits 0 when every line was answered, 1 when
any line failed (an `error: ...`, refused rules, a failed `:reload`; every line is
still answered, and stderr names the failed lines), 2 when the rule file does not
load (its diagnostics on stderr). Interactive use exits 0. The answers come from
repl_console; this module only reads lines and writes answers. Never runs plugins,
opens no sockets.
"""

from __future__ import annotations

import os
import sys

import click

from dynproxy.cli.repl_console import Answer, Console
from dynproxy.cli.repl_session import QUERY_KEYS, Session
from dynproxy.lang import ast
from dynproxy.lang.diagnostics import RulesError
from dynproxy.lang.explain import iter_atoms

HISTORY_FILE = "~/.dynproxy_history"
HISTORY_LENGTH = 1000
MAX_LINE = 64 * 1024
MAX_FAILED_SHOWN = 20  # line numbers named on stderr when a script had failures
PROMPT = "dynproxy> "


@click.command()
@click.option("--rules", "rules_path", required=True, metavar="FILE",
              help="The rule file to load (its includes come along).")
@click.option("--plugin", "plugins", multiple=True, metavar="NAME",
              help="A routing plugin the rules may name besides the built-in ones "
                   "(repeatable); plugins are never run in the REPL.")
def repl(rules_path: str, plugins: tuple[str, ...]) -> None:
    """Answer "where does this connection go?" for queries like
    `sni=api.example.com src=10.1.2.3 dport=443`; `:help` lists the commands."""
    _tolerant_output()
    console = Console(_open_session(rules_path, plugins))
    try:
        if sys.stdin.isatty():
            interactive(console)
            return
        failed = scripted(console, sys.stdin.buffer, sys.stdout)
    except OSError as exc:  # stdout closed or full, stdin unreadable: stop, one line, no trace
        _abandon_output()
        if not isinstance(exc, BrokenPipeError):  # a reader that left wants no message
            sys.stderr.write(f"dynproxy repl: cannot go on: {exc.strerror or exc}\n")
        sys.exit(1)
    if failed:  # like `python < file`: a script with a failed line fails, for CI checks
        sys.stderr.write(failure_summary(failed) + "\n")
        sys.exit(1)


def failure_summary(failed: list[int]) -> str:
    """`dynproxy repl: 2 lines failed (input lines 3, 7)`, naming at most MAX_FAILED_SHOWN."""
    count = "1 line" if len(failed) == 1 else f"{len(failed)} lines"
    shown = ", ".join(map(str, failed[:MAX_FAILED_SHOWN]))
    more = ", ..." if len(failed) > MAX_FAILED_SHOWN else ""
    which = "input line" if len(failed) == 1 else "input lines"
    return f"dynproxy repl: {count} failed ({which} {shown}{more})"


def _tolerant_output() -> None:
    # An answer may echo odd input back; it must never fail to print.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _abandon_output() -> None:
    # Point stdout at /dev/null so that the flush at exit cannot fail a second time.
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _open_session(path: str, plugins: tuple[str, ...]) -> Session:
    try:
        return Session(path, plugins)
    except RulesError as exc:
        sys.stderr.write(exc.render())
        sys.stderr.write(f"dynproxy repl: {path!r} has errors; fix them and start again\n")
    except Exception as exc:  # no traceback for any input, even one nobody foresaw
        sys.stderr.write(f"dynproxy repl: internal error loading {path!r}: "
                         f"{type(exc).__name__}: {exc}\n")
    sys.exit(2)


# --- scripted: one answer per query line ---------------------------------------------


def scripted(console: Console, stream, out) -> list[int]:
    """Answer every line of `stream` on `out`; returns the numbers of the lines that failed."""
    first, failed = True, []
    for number, raw in enumerate(read_lines(stream), 1):
        line = _decode(raw, number)
        if isinstance(line, str):
            if not line.strip() or line.strip().startswith("#"):
                continue
            line = console.handle(line)
        answer = line
        if answer.quit:
            break
        out.write(("" if first else "\n") + answer.text + "\n")
        out.flush()
        first = False
        if answer.failed:
            failed.append(number)
    return failed


def read_lines(stream):
    """Lines as bytes; a line over MAX_LINE is consumed and replaced by None."""
    while True:
        raw = stream.readline(MAX_LINE + 1)
        if not raw:
            return
        if len(raw) > MAX_LINE and not raw.endswith(b"\n"):
            while (rest := stream.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                pass
            yield None
        else:
            yield raw


def _decode(raw: bytes | None, number: int):
    """The line's text, or an Answer saying why it cannot be read."""
    if raw is None:
        return Answer(f"error: line {number} is longer than {MAX_LINE} bytes; skipped",
                      failed=True)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Answer(f"error: line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} "
                      f"at offset {exc.start}); skipped", failed=True)


# --- interactive: prompt, history, completion ------------------------------------------


def interactive(console: Console) -> None:
    history = _setup_readline(console)
    ruleset = console.session.ruleset
    warnings = len(ruleset.diagnostics)
    noted = f", {warnings} lint warning(s) (:lint shows them)" if warnings else ""
    print(f"dynproxy repl: {len(ruleset.rules)} rules from {console.session.path}{noted}; "
          ":help for commands, :quit to leave")
    try:
        _prompt_loop(console)
    finally:
        _save_history(history)


def _prompt_loop(console: Console) -> None:
    while True:
        try:
            line = input(PROMPT)
            if not line.strip() or line.strip().startswith("#"):
                continue
            answer = console.handle(line)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:  # Ctrl-C drops the line (or the answer), not the session
            print()
            continue
        if answer.quit:
            return
        print(answer.text)


def _setup_readline(console: Console) -> str | None:
    """Load history and bind tab completion; returns the history path (None: no readline)."""
    try:
        import readline
    except ImportError:
        return None
    path = os.path.expanduser(HISTORY_FILE)
    try:
        readline.read_history_file(path)
    except (OSError, UnicodeError):
        pass  # no history yet, or an unreadable one: start fresh
    readline.set_history_length(HISTORY_LENGTH)
    readline.set_completer_delims(" \t\n(,")
    readline.set_completer(Completer(console).complete)
    binding = "bind ^I rl_complete" if "libedit" in (readline.__doc__ or "") else "tab: complete"
    readline.parse_and_bind(binding)
    return path


def _save_history(path: str | None) -> None:
    if path is None:
        return
    try:
        import readline

        readline.write_history_file(path)
    except OSError:
        pass  # a read-only home must not spoil leaving the REPL


class Completer:
    """readline's completer protocol over `candidates()`, which does the thinking."""

    def __init__(self, console: Console):
        self.console = console
        self._matches: list[str] = []

    def complete(self, word: str, state: int) -> str | None:
        if state == 0:
            import readline

            before = readline.get_line_buffer()[: readline.get_begidx()]
            try:
                self._matches = candidates(self.console, before, word)
            except Exception:  # completion must never break the prompt
                self._matches = []
        return self._matches[state] if state < len(self._matches) else None


RULE_WORDS = ("sni", "src", "dport", "proto", "alpn", "exact", "suffix", "prefix", "glob",
              "and", "or", "not", "->", "forward(", "lb(", "reject", "plugin(", "terminate",
              "tls", "then", "default", "rule", "tcp", "udp")


def candidates(console: Console, before: str, word: str) -> list[str]:
    """Completions of `word`, given the text `before` it on the line."""
    words = before.split()
    if not words:
        options = [c + " " for c in console.commands] if word.startswith(":") else \
            _query_options(console, before, word)
    elif words[0] in (":drop", ":add"):
        options = _edit_options(console, words, word)
    elif words[0].startswith(":"):
        options = []
    else:
        options = _query_options(console, before, word)
    return sorted(o for o in options if o.startswith(word))


def _edit_options(console: Console, words: list[str], word: str) -> list[str]:
    numbers = [f"{i} " for i in range(1, len(console.session.rules) + 1)]
    if words[0] == ":drop":
        return numbers if len(words) == 1 else []
    ruleset = console.session.ruleset
    names = [*ruleset.backends, *ruleset.pools]
    return (numbers if len(words) == 1 else []) + names + list(RULE_WORDS)


def _query_options(console: Console, before: str, word: str) -> list[str]:
    key, eq, _ = word.partition("=")
    if not eq:
        used = {w.partition("=")[0] for w in before.split()}
        return [k + "=" for k in QUERY_KEYS if k not in used]
    values = {"proto": ("tcp", "udp"), "sni": _exact_names(console),
              "alpn": _alpn_names(console)}.get(key, ())
    return [f"{key}={v} " for v in values]


def _exact_names(console: Console) -> list[str]:
    return sorted({i.value.lower() for r in console.session.rules
                   for a in iter_atoms(r.cond)
                   if isinstance(a, ast.Sni) and a.op == "exact" for i in a.patterns})


def _alpn_names(console: Console) -> list[str]:
    return sorted({i.value for r in console.session.rules for a in iter_atoms(r.cond)
                   if isinstance(a, ast.Alpn) for i in a.protocols})
