"""Names and declarations: the checks that make a rule file invalid (E2xx), and W310.

Resolves every name a rule or pool uses (backends, pools, plugins, certificates),
finds duplicates, checks pools (members, weights, fallbacks, health settings) and the
values in each rule via lang.value_checks. Returns diagnostics and the rules the
analysis must leave out (their values are broken). No I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from dynproxy.lang import ast
from dynproxy.lang import value_checks as vc
from dynproxy.lang.diagnostics import Diagnostic, did_you_mean, error, help_, note, warning


@dataclass
class CheckResult:
    diagnostics: list[Diagnostic]
    broken_rules: frozenset[int]  # leave these out of lang.analysis


@dataclass
class _Scope:
    backends: dict[str, ast.BackendDecl] = field(default_factory=dict)
    pools: dict[str, ast.PoolDecl] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    out: list[Diagnostic] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return sorted(self.backends.keys() | self.pools.keys())


def check_program(program: ast.Program, *, plugins: frozenset[str],
                  certificates: frozenset[str] | None) -> CheckResult:
    scope = _Scope()
    _declare(program, scope)
    for b in program.backends:
        _check_backend(b, scope)
    for p in program.pools:
        _check_pool(p, scope)
    _check_fallback_cycles(program.pools, scope)
    broken = _check_rules(program.rules, scope, plugins, certificates)
    _unused(program, scope)
    return CheckResult(scope.out, frozenset(broken))


# --- declarations ---------------------------------------------------------------


def _declare(program: ast.Program, s: _Scope) -> None:
    for kind, decls, table in (("backend", program.backends, s.backends),
                               ("pool", program.pools, s.pools)):
        for d in decls:
            first = table.get(d.name)
            if first is None:
                table[d.name] = d
                continue
            s.out.append(error("E201", f"{kind} {d.name!r} is declared twice", d.name_pos,
                               note("first declared here", first.name_pos)))
    for name in s.backends.keys() & s.pools.keys():
        b, p = s.backends[name], s.pools[name]
        later, earlier = (b, p) if _before(p.name_pos, b.name_pos) else (p, b)
        kind = "backend" if earlier is b else "pool"
        s.out.append(error(
            "E205", f"{name!r} is declared both as a backend and as a pool", later.name_pos,
            note(f"declared as a {kind} here", earlier.name_pos),
            help_("give one of them another name; forward() and lb() could not tell them apart"),
        ))


def _before(a: ast.Pos, b: ast.Pos) -> bool:
    return a.file == b.file and (a.line, a.col) < (b.line, b.col)


def _check_backend(b: ast.BackendDecl, s: _Scope) -> None:
    s.out += [d for d in (vc.endpoint_diagnostic(b.endpoint),
                          vc.weight_diagnostic(b.weight, b.pos)) if d]
    s.out += vc.backend_tls_diagnostics(b.tls)


def _check_pool(p: ast.PoolDecl, s: _Scope) -> None:
    listed: dict[str, ast.Member] = {}
    for m in p.members:
        s.out += [d for d in (vc.weight_diagnostic(m.weight, m.pos),
                              m.endpoint and vc.endpoint_diagnostic(m.endpoint)) if d]
        if m.ref is not None:
            _check_member_ref(p, m, listed, s)
    s.out += [d for rm in p.redis if (d := vc.redis_pattern_diagnostic(rm))]
    s.out += vc.health_diagnostics(p.health)
    _check_pool_weight(p, s)
    if p.fallback is not None:
        _check_fallback(p, s)


def _check_member_ref(p: ast.PoolDecl, m: ast.Member, listed: dict, s: _Scope) -> None:
    name = m.ref.name
    s.used.add(name)
    if name in listed:
        s.out.append(error("E201", f"backend {name!r} is a member of pool {p.name!r} twice",
                           m.ref.pos, note("first listed here", listed[name].ref.pos)))
    listed.setdefault(name, m)
    if name in s.backends:
        return
    if name in s.pools:
        s.out.append(error("E200", f"{name!r} is a pool; a pool member must be a backend or "
                           "HOST:PORT", m.ref.pos,
                           help_("list that pool's members here, or use lb(...) over both pools")))
        return
    s.out.append(_unknown("backend", name, m.ref.pos, sorted(s.backends)))


def _check_pool_weight(p: ast.PoolDecl, s: _Scope) -> None:
    if p.redis:
        return
    if not p.members:
        s.out.append(error("E216", f"pool {p.name!r} has no members", p.name_pos,
                           help_('add `member NAME`, `member HOST:PORT` or '
                                 '`members from redis "GLOB"`')))
        return
    weights = [_member_weight(m, s) for m in p.members]
    if all(w == 0 for w in weights):
        s.out.append(error("E216", f"every member of pool {p.name!r} has weight 0, so it can "
                           "never be chosen", p.name_pos,
                           help_("give at least one member a weight above 0")))


def _member_weight(m: ast.Member, s: _Scope) -> int | None:
    if m.weight is not None:
        return m.weight
    backend = s.backends.get(m.ref.name) if m.ref else None
    if backend is not None and backend.weight is not None:
        return backend.weight
    return 1


def _check_fallback(p: ast.PoolDecl, s: _Scope) -> None:
    ref = p.fallback
    s.used.add(ref.name)
    if ref.name == p.name:
        s.out.append(error("E206", f"pool {p.name!r} falls back to itself", ref.pos,
                           help_("name another backend or pool, or drop the fallback")))
    elif ref.name not in s.backends and ref.name not in s.pools:
        hint = did_you_mean(ref.name, s.targets) or help_("name a declared backend or pool")
        s.out.append(error("E206", f"pool {p.name!r} falls back to {ref.name!r}, which is not a "
                           "declared backend or pool", ref.pos, hint))


def _check_fallback_cycles(pools, s: _Scope) -> None:
    reported: set[str] = set()
    for p in pools:
        chain, name = [p.name], _fallback_of(p.name, s)
        while name in s.pools and name not in chain and name != p.name:
            chain.append(name)
            name = _fallback_of(name, s)
        if name == p.name and len(chain) > 1 and not reported & set(chain):
            reported |= set(chain)
            s.out.append(error("E206", "pool fallbacks form a loop: " + " -> ".join(chain + [name]),
                               p.fallback.pos, help_("end the chain at a backend or a pool "
                                                      "without fallback")))


def _fallback_of(pool: str, s: _Scope) -> str | None:
    ref = s.pools[pool].fallback
    return ref.name if ref else None


def _unknown(kind: str, name: str, pos: ast.Pos, known) -> Diagnostic:
    found = did_you_mean(name, known)
    hint = found or help_(f"declare it with `backend {name} HOST:PORT` or `pool {name} {{ ... }}`")
    return error("E200", f"unknown {kind} {name!r}", pos, hint)


# --- rules ----------------------------------------------------------------------


def _check_rules(rules, s: _Scope, plugins, certificates) -> set[int]:
    broken: set[int] = set()
    names: dict[str, ast.Rule] = {}
    default: ast.Rule | None = None
    for i, rule in enumerate(rules):
        values = vc.condition_diagnostics(rule.cond)
        if values:
            broken.add(i)
            s.out += values
        if rule.name is not None:
            first = names.setdefault(rule.name, rule)
            if first is not rule:
                s.out.append(error("E202", f"rule name {rule.name!r} is used twice",
                                   rule.name_pos, note("first used here", first.name_pos or first.pos)))
        if rule.is_default:
            if default is not None:
                broken.add(i)
                s.out.append(error("E217", "a second `default` rule", rule.pos,
                                   note("first default here", default.pos),
                                   help_("keep one `default`; it catches what no rule matched")))
            default = default or rule
        _check_action(rule.action, s, plugins, certificates)
    return broken


def _check_action(action: ast.Action, s: _Scope, plugins, certificates) -> None:
    if isinstance(action, ast.Forward):
        _check_target(action.target, s)
    elif isinstance(action, ast.Lb):
        _check_lb(action, s)
    elif isinstance(action, ast.Terminate):
        if action.cert is not None and certificates is not None:
            _check_cert(action.cert, certificates, s)
        s.out += vc.alpn_diagnostics(action.alpn or ())
        _check_action(action.then, s, plugins, certificates)
    elif isinstance(action, ast.Plugin) and action.name.name not in plugins:
        ref = action.name
        hint = did_you_mean(ref.name, plugins) or help_(
            f"known plugins: {', '.join(sorted(plugins)) or 'none'}; others are named in the "
            "config's `plugins:` list (pass it with --config)")
        s.out.append(error("E203", f"unknown plugin {ref.name!r}", ref.pos, hint))


def _check_target(ref: ast.Ref, s: _Scope) -> None:
    s.used.add(ref.name)
    if ref.name not in s.backends and ref.name not in s.pools:
        s.out.append(_unknown("backend or pool", ref.name, ref.pos, s.targets))


def _check_lb(lb: ast.Lb, s: _Scope) -> None:
    seen: dict[str, ast.LbTarget] = {}
    for t in lb.targets:
        _check_target(t.ref, s)
        if t.ref.name in seen:
            s.out.append(error("E201", f"{t.ref.name!r} appears twice in lb(...)", t.ref.pos,
                               note("first listed here", seen[t.ref.name].ref.pos),
                               help_("list each target once, with the sum of its weights")))
        seen.setdefault(t.ref.name, t)
        s.out += [d for d in (vc.weight_diagnostic(t.weight, t.pos),) if d]
    if all(t.weight == 0 for t in lb.targets):
        s.out.append(error("E216", "lb(...) has a total weight of 0, so no target can ever be "
                           "chosen", lb.pos, help_("give at least one target a weight above 0")))


def _check_cert(ref: ast.Ref, certificates: frozenset[str], s: _Scope) -> None:
    if ref.name in certificates:
        return
    hint = did_you_mean(ref.name, certificates) or help_(
        "certificates are named in the config's tls.certificates list (`name: ...`)")
    s.out.append(error("E204", f"unknown certificate {ref.name!r}", ref.pos, hint))


def _unused(program: ast.Program, s: _Scope) -> None:
    for kind, table in (("backend", s.backends), ("pool", s.pools)):
        for name, decl in table.items():
            if name not in s.used:
                s.out.append(warning(
                    "W310", f"{kind} {name!r} is declared but never used", decl.name_pos,
                    help_("use it in forward(), lb(), a pool member or a fallback, or delete it"),
                ))
