"""The linter: golden files, the analysis on small cases, and soundness against a
brute-force reference evaluator (every warning it gives must hold on real samples)."""

from __future__ import annotations

import ipaddress
import os
import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynproxy.cli.lint import lint
from dynproxy.lang import lint as lint_module
from dynproxy.lang.lint import BUILTIN_PLUGINS, lint_path, lint_program
from dynproxy.lang.loader import load_program_text
from dynproxy.lang.sni_sets import EMPTY, NONEMPTY, SniSet, names_witness, sni_status

GOLDEN = Path(__file__).resolve().parent / "golden"
INVALID = sorted((GOLDEN / "invalid").glob("*.rules"))
VALID = sorted((GOLDEN / "valid").glob("*.rules"))
LINTER_CODES = {
    "E200", "E201", "E202", "E203", "E204", "E205", "E206", "E210", "E211", "E212", "E213",
    "E214", "E215", "E216", "E217", "E218", "W220", "W221", "W300", "W301", "W302", "W310",
}
HEADER = "backend a 127.0.0.1:9001\nbackend b 127.0.0.1:9002\n"


def run_cli(args: list[str]) -> tuple[str, int]:
    cwd = os.getcwd()
    os.chdir(GOLDEN)
    try:
        result = CliRunner().invoke(lint, args, catch_exceptions=False)
    finally:
        os.chdir(cwd)
    return result.output, result.exit_code


def golden_args(rules: Path) -> list[str]:
    args = [str(rules.relative_to(GOLDEN))]
    config = rules.with_suffix(".config.yaml")
    return ["--config", str(config.relative_to(GOLDEN))] + args if config.exists() else args


def lint_text(text: str, **kw):
    program, load_diags = load_program_text(HEADER + text, "t.rules")
    assert not load_diags, load_diags
    return lint_program(program, **kw)


def codes(text: str, unused: bool = False, **kw) -> list[tuple[str, int]]:
    """(code, line in `text`) for each diagnostic, lines counted after the header;
    W310 (the header's backends unused) only when asked for."""
    found = [(d.code, d.pos.line - 2) for d in lint_text(text, **kw)]
    return [c for c in found if unused or c[0] != "W310"]


# --- golden files -------------------------------------------------------------------


@pytest.mark.parametrize("rules", INVALID, ids=lambda p: p.stem)
def test_invalid_golden_output_is_exact(rules: Path):
    expected = rules.with_suffix(".expected").read_text(encoding="utf-8")
    output, exit_code = run_cli(golden_args(rules))
    assert output == expected
    assert exit_code == (2 if "error[" in expected else 0)
    assert f"[{rules.stem.split('_')[0]}]" in output  # the file shows the check it is named for


@pytest.mark.parametrize("rules", VALID, ids=lambda p: p.stem)
def test_valid_golden_lints_clean(rules: Path):
    output, exit_code = run_cli(["--strict", str(rules.relative_to(GOLDEN))])
    assert (output, exit_code) == (f"valid/{rules.name}: ok\n", 0)
    diags, sources = lint_path(rules)
    assert diags == [] and str(rules) in {str(Path(k)) for k in sources}


def test_every_linter_check_has_a_golden_file():
    named = {p.stem.split("_")[0] for p in INVALID}
    assert LINTER_CODES <= named
    assert all(p.with_suffix(".expected").exists() for p in INVALID)


def test_the_design_example_is_among_the_valid_files():
    text = (GOLDEN / "valid" / "example.rules").read_text()
    assert 'include "rules.d/*.rules"' in text and "default -> reject" in text
    program, _ = load_program_text(text, "x", base_dir=str(GOLDEN / "valid"))
    assert any(r.name == "smtp" for r in program.rules)  # the include target was spliced in


# --- names and declarations ----------------------------------------------------------


def test_plugins_and_certificates_come_from_the_caller():
    text = 'sni suffix ".a.com" -> plugin(mine)\nsni exact "b.com" -> terminate tls cert c then forward(a)\n'
    assert ("E203", 1) in codes(text)
    assert not any(c == "E204" for c, _ in codes(text))  # certificates unknown: not checked
    known = codes(text, plugins=BUILTIN_PLUGINS | {"mine"}, certificates=frozenset({"c"}))
    assert not [c for c in known if c[0].startswith("E")]
    assert ("E204", 2) in codes(text, certificates=frozenset({"other"}))


def test_unused_declarations_count_every_kind_of_reference():
    text = ("backend c 127.0.0.1:3\nbackend d 127.0.0.1:4\npool p { member c fallback d }\n"
            "pool q { member c }\ndport 1 -> lb(a, b:2)\ndport 2 -> forward(p)\n")
    assert codes(text, unused=True) == [("W310", 4)]


def test_broken_values_keep_the_rule_out_of_the_analysis():
    # the bad CIDR is an error; the rule must not also shadow the next one
    text = "src 10.0.0.1/8 or proto tcp -> forward(a)\nproto tcp and dport 80 -> forward(b)\n"
    assert codes(text) == [("E210", 1)]


# --- the analysis ---------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    # a connection without SNI matches `not sni ...`; UDP never has SNI
    ('not sni exact "a.com" -> forward(a)\nproto udp -> forward(b)\n', [("W300", 2)]),
    # IPv4-mapped networks are IPv4; an IPv6 /0 holds no IPv4 client
    ("src ::ffff:10.0.0.0/104 -> forward(a)\nsrc 10.1.0.0/16 -> forward(b)\n", [("W300", 2)]),
    ("src ::/0 -> forward(a)\nsrc 10.0.0.0/8 -> forward(b)\n", []),
    # alpn: any offered protocol in the set
    ('alpn "h2" -> forward(a)\nalpn ["h2", "h3"] -> forward(b)\n', []),
    ('alpn "h2" -> forward(a)\nalpn "h3" and alpn "h2" -> forward(b)\n', [("W300", 2)]),
    ('not alpn "h2" -> forward(a)\nalpn "h2" -> forward(b)\nproto tcp -> reject\n',
     [("W300", 3)]),
    # a plugin may pass to the next rule, so it shadows nothing
    ('sni suffix ".a.com" -> plugin(redis_sni)\nsni exact "x.a.com" -> forward(b)\n', []),
    ('sni suffix ".a.com" -> forward(a)\nsni exact "x.a.com" -> plugin(redis_sni)\n',
     [("W300", 2)]),
    # same action: no specificity warning; the exact rule is still reachable
    ('sni suffix ".a.com" and dport 443 -> forward(a)\nsni exact "x.a.com" -> forward(a)\n', []),
    # a union of three covers the last rule
    ("dport 1..100 -> forward(a)\ndport 101..65535 and src 10.0.0.0/8 -> forward(a)\n"
     "dport 101..65535 and not src 10.0.0.0/8 -> forward(b)\nsrc 192.0.2.0/24 -> reject\n",
     [("W300", 4)]),
    # globs: '*' is one label, so these do not overlap
    ('sni glob "*.example.com" -> forward(a)\nsni suffix ".b.example.com" -> forward(b)\n', []),
    ('sni glob "**.example.com" -> forward(a)\nsni suffix ".b.example.com" -> forward(b)\n',
     [("W300", 2)]),
    ('sni prefix "api." -> forward(a)\nsni glob "api.*.com" -> forward(b)\n', [("W300", 2)]),
    # partial overlap of exact lists says nothing (neither rule is unreachable)
    ('sni exact ["a.com", "b.com"] -> forward(a)\nsni exact ["b.com", "c.com"] -> forward(b)\n',
     []),
    # a rule after default, and a default nothing reaches
    ("default -> reject\ndport 80 -> forward(a)\n", [("W300", 2)]),
    ("proto tcp -> forward(a)\nproto udp -> forward(b)\ndefault -> reject\n", [("W300", 3)]),
])
def test_analysis_cases(text, expected):
    assert codes(text) == expected


def test_a_rule_past_the_clause_cap_is_left_out_of_the_analysis():
    wide = " and ".join(f"(dport {p} or alpn \"p{p}\")" for p in range(1, 8))  # 128 clauses
    narrow = " and ".join(f"(dport {p} or alpn \"p{p}\")" for p in range(1, 7))  # 64
    assert codes(f"proto tcp or proto udp -> reject\n{wide} -> forward(a)\n") == []
    assert codes(f"proto tcp or proto udp -> reject\n{narrow} -> forward(a)\n") == [("W300", 2)]


def test_sni_sets_answer_unknown_rather_than_guess():
    x = frozenset
    assert names_witness((x({("glob", "*.internal.*")}), x({("glob", "api.**")})), x()) == \
        "api.internal.x"
    assert names_witness((x({("suffix", ".b.a.com")}),), x({("suffix", ".a.com")})) is None
    assert sni_status(SniSet(False, (x({("glob", "*.a.com")}),), x({("suffix", ".a.com")}))) \
        == EMPTY
    assert sni_status(SniSet(True, (x(),))) == NONEMPTY  # the no-SNI connection is in it


def test_an_internal_error_becomes_a_diagnostic(tmp_path, monkeypatch):
    path = tmp_path / "ok.rules"
    path.write_text(HEADER + "dport 80 -> forward(a)\ndport 81 -> forward(b)\n")

    def explode(*a, **kw):
        raise KeyError("boom")

    monkeypatch.setattr(lint_module, "lint_program", explode)
    diags, _ = lint_path(path)
    assert [(d.code, d.is_error) for d in diags] == [("E999", True)]
    assert "KeyError" in diags[0].message


def test_twenty_thousand_rules_with_planted_shadows(capsys):
    lines, planted = [], []
    for i in range(20_000):
        kind = i % 5
        if kind == 0:
            lines.append(f'sni exact "h{i}.zone{i % 97}.example.com" -> forward(a)')
        elif kind == 1:
            lines.append(f'sni suffix ".s{i}.example.org" -> forward(b)')
        elif kind == 2:
            lines.append(f'sni glob "*.g{i}.example.net" and dport 443 -> forward(a)')
        elif kind == 3:
            lines.append(f"src 10.{i >> 8 & 255}.{i & 255}.0/24 and dport [80, 8080] -> forward(b)")
        else:
            lines.append(f"proto udp and dport {1000 + i} -> forward(a)")
        if i % 2000 == 1999:  # a copy of an earlier rule, and a name inside an earlier suffix
            planted += [len(lines) + 1, len(lines) + 2]
            lines += [lines[-5], f'sni exact "x.s{i - 3}.example.org" -> forward(b)']
    start = time.perf_counter()
    found = codes("\n".join(lines) + "\n")
    with capsys.disabled():
        print(f"\n[lint 20,000+ rules: {time.perf_counter() - start:.1f} s]", end=" ")
    assert found == [("W300", line) for line in planted]


# --- soundness against a reference evaluator -----------------------------------------

SNI_CHOICES = {
    "exact": ["a.example.com", "example.com", "b.a.example.com", "x.org"],
    "suffix": [".example.com", ".a.example.com", ".org"],
    "prefix": ["a.", "b", "x"],
    "glob": ["*.example.com", "**.com", "*.a.*", "a.**", "?.org"],
}
SRC_CHOICES = ["10.0.0.0/8", "10.1.0.0/16", "2001:db8::/32", "::/0", "0.0.0.0/0",
               "::ffff:10.0.0.0/104", "192.168.0.0/16"]
PORT_CHOICES = ["80", "443", "1..1024", "[22, 8080]", "1025..65535"]
ALPN_CHOICES = ['"h2"', '["h2", "http/1.1"]', '"h3"']
SAMPLE_SNI = [None, "a.example.com", "b.a.example.com", "example.com", "x.org", "q.example.com",
              "a.b.c", "z.a.y", "a.x.example.com", "b.org", "c.com", "xy.org"]
SAMPLE_ALPN = [(), ("h2",), ("http/1.1",), ("h3", "h2"), ("foo",)]
SAMPLE_PORTS = [22, 80, 443, 1025, 8080]
SAMPLE_SRC = ["10.1.2.3", "10.9.9.9", "192.168.1.1", "8.8.8.8", "2001:db8::1", "2001:db9::1",
              "::ffff:10.1.2.3"]

atoms = st.one_of(
    st.sampled_from(sorted(SNI_CHOICES)).flatmap(
        lambda op: st.lists(st.sampled_from(SNI_CHOICES[op]), min_size=1, max_size=2, unique=True)
        .map(lambda vs, op=op: f"sni {op} [" + ", ".join(f'"{v}"' for v in vs) + "]")),
    st.lists(st.sampled_from(SRC_CHOICES), min_size=1, max_size=2, unique=True)
    .map(lambda vs: "src [" + ", ".join(vs) + "]"),
    st.sampled_from(PORT_CHOICES).map(lambda p: f"dport {p}"),
    st.sampled_from(["tcp", "udp"]).map(lambda p: f"proto {p}"),
    st.sampled_from(ALPN_CHOICES).map(lambda a: f"alpn {a}"),
)
conditions = st.recursive(
    atoms,
    lambda inner: st.one_of(
        inner.map(lambda c: f"not ({c})"),
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
    ),
    max_leaves=4,
)
rule_sets = st.lists(
    st.tuples(conditions, st.sampled_from(["forward(a)", "forward(b)", "plugin(redis_sni)"])),
    min_size=1, max_size=6,
)


def ref_glob(pattern: str, name: str) -> bool:
    pl, nl = pattern.split("."), name.split(".")

    def match(i: int, j: int) -> bool:
        if i == len(pl):
            return j == len(nl)
        if pl[i] == "**":
            return any(match(i + 1, k) for k in range(j + 1, len(nl) + 1))
        if j == len(nl):
            return False
        if pl[i] != "*" and (len(pl[i]) != len(nl[j]) or
                             any(p not in ("?", c) for p, c in zip(pl[i], nl[j], strict=True))):
            return False
        return match(i + 1, j + 1)

    return match(0, 0)


def ref_network(text: str):
    net = ipaddress.ip_network(text)
    if net.version == 6 and net.prefixlen >= 96 and net.network_address.ipv4_mapped:
        return ipaddress.ip_network(f"{net.network_address.ipv4_mapped}/{net.prefixlen - 96}")
    return net


def ref_compile(cond: str):
    """A generated condition as a plain Python predicate on one connection (no lang code)."""
    preds = []

    def atom(m: re.Match) -> str:
        preds.append(ref_atom(m.group(1), m.group(2)))
        return f"P[{len(preds) - 1}](c)"

    expr = re.sub(r"(sni \w+|src|dport|proto|alpn) (\[[^\]]*\]|\S+?)(?=\)|\s|$)", atom, cond)
    return eval(f"lambda c: {expr}", {"P": preds})  # only calls, and/or/not, () remain


def ref_atom(kind: str, arg: str):
    values = [v.strip().strip('"') for v in arg.strip("[]").split(",")]
    if kind.startswith("sni"):
        test = {"exact": str.__eq__, "suffix": str.endswith, "prefix": str.startswith,
                "glob": lambda n, p: ref_glob(p, n)}[kind.split()[1]]
        return lambda c: c["sni"] is not None and any(test(c["sni"], v) for v in values)
    if kind == "src":
        nets = [ref_network(v) for v in values]
        return lambda c: any(c["src"].version == n.version and c["src"] in n for n in nets)
    if kind == "dport" and ".." in arg:
        lo, hi = (int(x) for x in arg.split(".."))
        return lambda c: lo <= c["dport"] <= hi
    if kind == "dport":
        ports = {int(v) for v in values}
        return lambda c: c["dport"] in ports
    if kind == "proto":
        return lambda c: c["proto"] == arg
    return lambda c: bool(set(values) & set(c["alpn"]))


def samples():
    for src_text in SAMPLE_SRC:
        src = ipaddress.ip_address(src_text)
        src = src.ipv4_mapped or src if src.version == 6 else src
        for port in SAMPLE_PORTS:
            yield {"proto": "udp", "sni": None, "alpn": (), "dport": port, "src": src}
            for sni in SAMPLE_SNI:
                for alpn in SAMPLE_ALPN:
                    yield {"proto": "tcp", "sni": sni, "alpn": alpn, "dport": port, "src": src}


SAMPLES = list(samples())


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rule_sets, st.booleans())
def test_every_warning_holds_on_brute_force_samples(rules, with_default):
    lines = [f"{cond} -> {action}" for cond, action in rules]
    if with_default:
        lines.append("default -> reject")
    diags = lint_text("\n".join(lines) + "\n")
    assert not [d for d in diags if d.is_error], diags
    conds = [cond for cond, _ in rules] + (["proto tcp or proto udp"] if with_default else [])
    deciding = [action != "plugin(redis_sni)" for _, action in rules] + [True] * with_default
    reached = [False] * len(conds)
    preds = [ref_compile(c) for c in conds]
    matched = [[p(conn) for p in preds] for conn in SAMPLES]
    for row in matched:
        for i, hit in enumerate(row):
            if hit:
                reached[i] = True
                if deciding[i]:
                    break
    for d in diags:
        i = d.pos.line - 3
        if d.code == "W300":
            assert not reached[i], (d.message, lines)
        elif d.code == "W220":
            assert not any(row[i] for row in matched), (d.message, lines)
        elif d.code == "W221":
            assert not any(row[i] for row, c in zip(matched, SAMPLES, strict=True) if c["proto"] == "tcp")
        elif d.code == "W302":
            name = re.search(r"such as '([^']+)'", d.message).group(1)
            mine = {"sni": name, "alpn": (), "proto": "tcp", "dport": 443,
                    "src": ipaddress.ip_address("10.1.2.3")}
            mine_text = re.findall(r"`(sni [^`]+)`", d.message)
            assert all(ref_compile(t)(mine) for t in mine_text), (name, mine_text)
        else:
            assert d.code in ("W301", "W310"), d


PAIR_ATOMS = (
    [f'sni {op} "{v}"' for op, vs in SNI_CHOICES.items() for v in vs]
    + [f"src {v}" for v in SRC_CHOICES] + [f"dport {p}" for p in PORT_CHOICES]
    + ["proto tcp", "proto udp"] + [f"alpn {a}" for a in ALPN_CHOICES]
)


def test_no_false_warning_for_any_pair_of_atoms():
    """Exhaustive over `A -> a` then `B -> b` with A, B atoms or negated atoms."""
    literals = PAIR_ATOMS + [f"not ({a})" for a in PAIR_ATOMS]
    claims = 0
    for first in literals:
        for second in literals:
            diags = lint_text(f"{first} -> forward(a)\n{second} -> forward(b)\n")
            claims += _check_claims(diags, [first, second])
    assert claims > 100  # the check has teeth: many real warnings were verified


def _check_claims(diags, conds) -> int:
    found = [d for d in diags if d.code in ("W220", "W300")]
    if not found:
        return 0
    preds = [ref_compile(c) for c in conds]
    for d in found:
        i = d.pos.line - 3
        hits = [conn for conn in SAMPLES if preds[i](conn)]
        if d.code == "W300":
            hits = [conn for conn in hits if not any(p(conn) for p in preds[:i])]
        assert not hits, (d.code, conds, hits[:1])
    return len(found)


def test_every_code_is_documented_with_an_example():
    doc = (GOLDEN.parents[2] / "docs" / "lint-codes.md").read_text(encoding="utf-8")
    for code in LINTER_CODES | {"E001", "E100", "E101", "E102", "E110", "E111", "E112", "E999"}:
        section = doc.split(f"## {code}\n", 1)[1].split("\n## ", 1)[0]
        assert f"[{code}]: " in section, code
