"""The compiled router against RULES.md's meaning: a truth table, and a brute-force
reference evaluator (written here from the spec, independently of the index) that
must agree with the router on random rule sets and random connections."""

import ipaddress
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynproxy.core.router import ConnInfo
from dynproxy.lang import ast
from dynproxy.lang.compile import compile_program
from dynproxy.lang.loader import load_program_text

EXAMPLE = """
backend a      127.0.0.1:9001
backend b      127.0.0.1:9002
backend legacy 10.0.0.7:8443 send-proxy v2
pool web {
    member a weight 3
    member b
    balance least_conn
}
rule api: sni exact "api.example.com" and dport 443 -> forward(legacy)
alpn ["h2", "http/1.1"] and sni suffix ".secure.example.com" -> terminate tls then forward(web)
sni suffix ".apps.example.com" -> plugin(redis_sni)
sni suffix ".example.com" -> lb(a:3, b:1)
sni suffix ".example.org" and not src [10.0.0.0/8, 2001:db8::/32] -> lb(web, algo=hash(src))
sni glob "*.internal.*" or (proto udp and dport [53, 5000..5010]) -> reject
proto udp and dport 5353 -> forward(b)
sni prefix "admin." -> forward(a)
sni glob "**.deep.test" -> forward(b)
sni glob "web?.shop.test" -> forward(a)
default -> forward(a)
"""


def compiled(text):
    program, diags = load_program_text(text, "t.rules")
    assert not [d for d in diags if d.is_error], diags
    return program, compile_program(program)


def first_rule_line(text, **facts):
    program, c = compiled(text)
    conn = ConnInfo(facts.get("proto", "tcp"), facts.get("src"), facts.get("dport"),
                    facts.get("sni"), tuple(facts.get("alpn", ())))
    clause = c.router.first_clause(conn)
    return None if clause is None else program.rules[c.router.clauses[clause].rule].pos.line


@pytest.mark.parametrize("facts, line", [
    (dict(sni="api.example.com", dport=443), 10),
    (dict(sni="api.example.com", dport=8443), 13),
    (dict(sni="x.secure.example.com", alpn=["h2"]), 11),
    (dict(sni="x.secure.example.com", alpn=["spdy"]), 13),
    (dict(sni="t1.apps.example.com"), 12),
    (dict(sni="example.com"), 20),                      # the apex is not under the suffix
    (dict(sni="evilexample.com"), 20),
    (dict(sni="a.b.c.example.com"), 13),                # any depth
    (dict(sni="a.example.org", src="10.9.9.9"), 20),
    (dict(sni="a.example.org", src="::ffff:10.9.9.9"), 20),  # IPv4-mapped compares as IPv4
    (dict(sni="a.example.org", src="2001:db8::1"), 20),
    (dict(sni="a.example.org", src="192.0.2.1"), 14),
    (dict(sni="db.internal.corp"), 15),
    (dict(sni="db.x.internal.corp"), 20),               # '*' is exactly one label
    (dict(proto="udp", dport=53), 15),
    (dict(proto="udp", dport=5010), 15),
    (dict(proto="udp", dport=5011), 20),
    (dict(proto="udp", dport=5353), 16),
    (dict(proto="tcp", dport=5353), 20),
    (dict(sni="admin.foo"), 17),
    (dict(sni="x.admin.foo"), 20),
    (dict(sni="a.b.deep.test"), 18),
    (dict(sni="deep.test"), 20),                        # '**' is one or more labels
    (dict(sni="web1.shop.test"), 19),
    (dict(sni="web12.shop.test"), 20),                  # '?' is one character
    (dict(), 20),                                       # no SNI: no sni condition matches
])
def test_example_truth_table(facts, line):
    assert first_rule_line(EXAMPLE, **facts) == line


def test_no_default_means_no_match():
    assert first_rule_line('backend a 1.2.3.4:5\nsni exact "a.b" -> forward(a)', sni="c.d") is None


def test_start_skips_earlier_rules_for_plugin_fallthrough():
    program, c = compiled(EXAMPLE)
    conn = ConnInfo("tcp", None, 443, "t1.apps.example.com", ())
    first = c.router.clauses[c.router.first_clause(conn)].rule
    nxt = c.router.clauses[c.router.first_clause(conn, first + 1)].rule
    assert program.rules[first].pos.line == 12 and program.rules[nxt].pos.line == 13


def test_huge_dnf_falls_back_to_a_closure():
    cond = " and ".join(f"(dport {p} or sni exact \"h{p}.x\")" for p in range(1, 9))
    text = f"backend a 1.2.3.4:5\n{cond} -> forward(a)\n"
    program, c = compiled(text)
    assert len(c.router.clauses) == 1 and c.router.clauses[0].check is not None
    assert first_rule_line(text, dport=1, sni="h2.x") is None
    only_ports = f"backend a 1.2.3.4:5\n{' and '.join(f'(dport {p} or dport 1..9)' for p in range(1, 9))} -> forward(a)\n"
    assert first_rule_line(only_ports, dport=5) == 2


# --- brute force: random rules, independent evaluator ---------------------------

NAMES = ["a.example.com", "example.com", "b.a.example.com", "x.test", "admin.x.test",
         "web1.shop.test", "db.internal.corp", "q.deep.test", "p.q.deep.test"]
ADDRS = ["10.1.2.3", "10.200.0.1", "192.0.2.7", "2001:db8::5", "::ffff:10.1.2.3", "fe80::1"]


def ref_atom(atom, conn):
    sni, src = conn.sni, conn.src
    if isinstance(atom, ast.Sni):
        if sni is None:
            return False
        return any(ref_sni(atom.op, i.value, sni) for i in atom.patterns)
    if isinstance(atom, ast.Src):
        if src is None:
            return False
        ip = ipaddress.ip_address(src)
        if ip.version == 6 and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return any(ip in ipaddress.ip_network(i.value) for i in atom.networks)
    if isinstance(atom, ast.Dport):
        return conn.dport is not None and any(r.lo <= conn.dport <= r.hi for r in atom.ranges)
    if isinstance(atom, ast.Proto):
        return conn.proto == atom.proto
    return any(i.value in conn.alpn for i in atom.protocols)


def ref_sni(op, pattern, sni):
    if op == "exact":
        return sni == pattern
    if op == "suffix":
        return sni.endswith(pattern) and len(sni) > len(pattern)
    if op == "prefix":
        return sni.startswith(pattern)
    labels = [r"[^.]+(\.[^.]+)*" if lab == "**" else "[^.]+" if lab == "*"
              else "".join("[^.]" if ch == "?" else re.escape(ch) for ch in lab)
              for lab in pattern.split(".")]
    return re.fullmatch(r"\.".join(labels), sni) is not None


def ref_cond(cond, conn):
    if cond is None:
        return True
    if isinstance(cond, ast.Not):
        return not ref_cond(cond.operand, conn)
    if isinstance(cond, ast.And):
        return all(ref_cond(c, conn) for c in cond.operands)
    if isinstance(cond, ast.Or):
        return any(ref_cond(c, conn) for c in cond.operands)
    return ref_atom(cond, conn)


ATOMS = [
    'sni exact "a.example.com"', 'sni suffix ".example.com"', 'sni prefix "admin."',
    'sni glob "web?.shop.test"', 'sni glob "*.internal.*"', 'sni glob "**.deep.test"',
    'sni exact ["x.test", "example.com"]', "src 10.0.0.0/8", "src [192.0.2.0/24, 2001:db8::/32]",
    "dport 443", "dport [80, 1000..2000]", "proto udp", "proto tcp", 'alpn ["h2"]',
]


def random_cond(rng, depth=0):
    r = rng.random()
    if depth > 2 or r < 0.4:
        return rng.choice(ATOMS)
    if r < 0.55:
        return "not " + random_cond(rng, depth + 1)
    op = rng.choice([" and ", " or "])
    return "(" + op.join(random_cond(rng, depth + 1) for _ in range(rng.randint(2, 3))) + ")"


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32))
def test_router_agrees_with_reference(seed):
    rng = random.Random(seed)
    lines = ["backend a 127.0.0.1:1"]
    lines += [f"{random_cond(rng)} -> forward(a)" for _ in range(rng.randint(1, 25))]
    program, c = compiled("\n".join(lines) + "\n")
    for _ in range(40):
        conn = ConnInfo(rng.choice(["tcp", "udp"]), rng.choice(ADDRS + [None]),
                        rng.choice([None, 80, 443, 1500, 5353]), rng.choice(NAMES + [None]),
                        tuple(rng.sample(["h2", "http/1.1"], rng.randint(0, 2))))
        expected = next((i for i, r in enumerate(program.rules) if ref_cond(r.cond, conn)), None)
        clause = c.router.first_clause(conn)
        got = None if clause is None else c.router.clauses[clause].rule
        assert got == expected, (conn, program.rules[expected].text if expected is not None else None)
