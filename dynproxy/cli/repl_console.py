"""What the REPL answers: one input line (a query or a `:command`) -> one block of text.

The Console owns a Session and turns every line into an Answer; it never reads or
writes a terminal itself, so scripts, tests and the interactive loop share it. No
input line escapes as an exception: user mistakes become `error: ...` lines, rule
diagnostics are rendered in compiler format, and anything unexpected becomes
`internal error: ...`; such an Answer is marked `failed` (a script's exit status
counts them).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from dynproxy.cli.repl_session import SESSION, Session, SessionError, describe_rule, parse_query
from dynproxy.lang.diagnostics import RulesError, render_text
from dynproxy.lang.explain import Explanation, Step, explain, quote_string

MAX_SKIPS_SHOWN = 100
NO_MATCH_TEXT = "no rule matched: the connection is rejected (add a `default -> ...` rule)"

HELP = """\
A query describes a connection; the answer says where it goes and why:
  sni=api.example.com src=10.1.2.3 dport=443 proto=tcp alpn=h2,http/1.1
  (any subset; proto defaults to tcp; UDP carries no sni or alpn)
Commands:
  :rules              the rules, numbered in decision order, with file:line
  :pools              pools: members, weights, balancing, health, redis patterns
  :backends           backends and their addresses
  :add [N] RULE       add a rule for this session (at the end, or before rule N)
  :drop N             drop rule N for this session
  :reload             re-read the rule file from disk, keeping this session's edits
  :lint               the linter's warnings for the current rules
  :help               this text
  :quit               leave (so does end of input)
Plugins are not run here: a plugin rule shows what the rules decide when it has no
opinion."""


@dataclass(frozen=True, slots=True)
class Answer:
    text: str
    quit: bool = False
    failed: bool = False  # the line was refused: a user mistake, bad rules, an internal error


class Console:
    def __init__(self, session: Session):
        self.session = session
        self.commands = {
            ":help": self.help, ":rules": self.list_rules, ":pools": self.list_pools,
            ":backends": self.list_backends, ":add": self.add, ":drop": self.drop,
            ":reload": self.reload, ":lint": self.lint, ":quit": self.quit,
        }
        self.aliases = {":q": ":quit", ":exit": ":quit", ":h": ":help", ":?": ":help"}

    def handle(self, line: str) -> Answer:
        """Answer one line; never raises (except KeyboardInterrupt and the like)."""
        try:
            return self._dispatch(line.strip())
        except SessionError as exc:
            return Answer(f"error: {exc}", failed=True)
        except RulesError as exc:
            return Answer(render_errors(exc) + "\nnothing changed", failed=True)
        except Exception as exc:  # the session must survive anything a line can cause
            return Answer(f"internal error: {type(exc).__name__}: {exc}", failed=True)

    def _dispatch(self, line: str) -> Answer:
        if not line.startswith(":"):
            return Answer(self.query(line))
        name, _, rest = line.partition(" ")
        command = self.commands.get(self.aliases.get(name, name))
        if command is None:
            close = difflib.get_close_matches(name, self.commands, n=1, cutoff=0.5)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise SessionError(f"unknown command {name[:40]!r}{hint}; :help lists the commands")
        answer = command(rest.strip())
        return answer if isinstance(answer, Answer) else Answer(answer)

    # queries -----------------------------------------------------------------------
    def query(self, line: str) -> str:
        return render_explanation(explain(self.session.ruleset, parse_query(line)))

    # listing -----------------------------------------------------------------------
    def help(self, arg: str) -> str:
        return HELP

    def list_rules(self, arg: str) -> str:
        _no_argument(":rules", arg)
        rules = self.session.rules
        if not rules:
            return "no rules: every connection is rejected"
        return "\n".join(describe_rule(i, r) for i, r in enumerate(rules, 1))

    def list_pools(self, arg: str) -> str:
        _no_argument(":pools", arg)
        pools = self.session.ruleset.pools.values()
        return "\n".join(describe_pool(p) for p in pools) or "no pools declared"

    def list_backends(self, arg: str) -> str:
        _no_argument(":backends", arg)
        backends = self.session.ruleset.backends.values()
        return "\n".join(describe_backend(b) for b in backends) or "no backends declared"

    def lint(self, arg: str) -> str:
        _no_argument(":lint", arg)
        ruleset = self.session.ruleset
        if not ruleset.diagnostics:
            return f"the rules lint clean ({len(ruleset.rules)} rules)"
        return render_text(ruleset.diagnostics, ruleset.program.sources).rstrip("\n")

    def quit(self, arg: str) -> Answer:
        return Answer("", quit=True)

    # edits -------------------------------------------------------------------------
    def add(self, arg: str) -> str:
        first, _, rest = arg.partition(" ")
        before = int(first) if first.isascii() and first.isdigit() else None
        text = rest.strip() if before is not None else arg
        if not text:
            raise SessionError("`:add [N] RULE` needs a rule, e.g. "
                               ":add sni exact \"a.example.com\" -> reject")
        notes = self.session.add(text, before)
        line = len(self.session.lines)
        number = next(i for i, r in enumerate(self.session.rules, 1)
                      if r.pos.file == SESSION and r.pos.line == line)
        out = [f"added {describe_rule(number, self.session.rules[number - 1])}", *notes]
        return "\n".join(out + self._warnings_at(SESSION, line))

    def drop(self, arg: str) -> str:
        if not (arg.isascii() and arg.isdigit()):
            raise SessionError("`:drop N` takes a rule number (:rules lists them)")
        number = self.session.number(int(arg))
        label = describe_rule(number, self.session.rules[number - 1])
        notes = self.session.drop(number)
        return "\n".join([f"dropped {label}", *notes])

    def reload(self, arg: str) -> str | Answer:
        _no_argument(":reload", arg)
        try:
            notes = self.session.reload()
        except RulesError as exc:
            kept = len(self.session.rules)
            return Answer(render_errors(exc) + "\nreload failed: keeping the previous rules "
                          f"({kept} rules)", failed=True)
        ruleset = self.session.ruleset
        warnings = render_text(ruleset.diagnostics, ruleset.program.sources).rstrip("\n")
        done = f"reloaded {self.session.path}: {len(ruleset.rules)} rules"
        return "\n".join(filter(None, [warnings, *notes, done]))

    def _warnings_at(self, file: str, line: int) -> list[str]:
        ruleset = self.session.ruleset
        mine = [d for d in ruleset.diagnostics if d.pos.file == file and d.pos.line == line]
        return [render_text(mine, ruleset.program.sources).rstrip("\n")] if mine else []


def render_errors(exc: RulesError) -> str:
    """Why a change was refused: its errors only (warnings elsewhere are not the reason)."""
    errors = [d for d in exc.diagnostics if d.is_error] or list(exc.diagnostics)
    return render_text(errors, exc.sources).rstrip("\n")


def _no_argument(command: str, arg: str) -> None:
    if arg:
        raise SessionError(f"`{command}` takes no arguments")


# --- rendering --------------------------------------------------------------------------


def render_explanation(e: Explanation) -> str:
    out = []
    for i, step in enumerate(e.steps):
        lead = "decision: " if i == 0 else f"if plugin {e.steps[i - 1].decision.plugin!r} " \
            "has no opinion: "
        out.append(lead + _step_decision(step))
        out.append(f"rule: {_step_rule(step)}")
    if e.deciding is None:
        lead = "decision: reject" if not e.steps else \
            f"if plugin {e.steps[-1].decision.plugin!r} has no opinion: reject"
        out += [lead, NO_MATCH_TEXT]
    shown = e.skipped[:MAX_SKIPS_SHOWN]
    out += [f"skipped: #{s.number} {s}" for s in shown]
    if len(e.skipped) > len(shown):
        out.append(f"... and {len(e.skipped) - len(shown)} more earlier rules did not match")
    return "\n".join(out)


def _step_decision(step: Step) -> str:
    d = step.decision
    if d.action == "plugin":
        return f"{d.describe()}: would consult plugin {d.plugin!r} (plugins are not run " \
            "in the REPL)"
    return d.describe()


def _step_rule(step: Step) -> str:
    return describe_rule(step.number, step.rule)


def describe_backend(b) -> str:
    text = f"backend {b.name} {b.address} weight {b.weight}"
    if b.send_proxy:
        text += f" send-proxy {b.send_proxy}"
    if b.tls:
        text += " tls" + (f" ca {b.tls.ca!r}" if b.tls.ca else "") + \
            (f" sni {b.tls.sni!r}" if b.tls.sni else "") + ("" if b.tls.verify else " no-verify")
    return text


def describe_pool(p) -> str:
    algo = f"hash({p.hash_key})" if p.algo == "hash" else p.algo
    lines = [f"pool {p.name}: balance {algo}; {_health(p.health)}"
             + (f"; fallback {p.fallback}" if p.fallback else "")]
    for m in p.members:
        name = "" if m.backend.name == m.backend.address else f"{m.backend.name} "
        lines.append(f"  member {name}{m.backend.address} weight {m.weight}")
    lines += [f"  members from redis {quote_string(pattern)}" for pattern in p.redis_patterns]
    if not p.members and not p.redis_patterns:
        lines.append("  (no members)")
    return "\n".join(lines)


def _health(h) -> str:
    if h is None:
        return "no health check declared"
    text = f"health {h.kind} every {_duration(h.interval)} timeout {_duration(h.timeout)} " \
        f"rise {h.rise} fall {h.fall}"
    if h.send is not None:
        text += f" send {h.send!r} expect {h.expect!r}"
    return text


def _duration(seconds: float) -> str:
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds == int(seconds):
        return f"{int(seconds)}s"
    return f"{round(seconds * 1000)}ms"
