"""lang.explain: the deciding rule, and the first failing atom of every earlier rule,
with its position and a reason in words; plugin rules seen as steps with no opinion."""

import random

import pytest

import dynproxy.lang
from dynproxy.core.decision import NO_MATCH
from dynproxy.core.router import ConnInfo, parse_src
from dynproxy.lang.explain import atom_text, explain, holds, iter_atoms

RULES = """\
backend a      127.0.0.1:9001
backend b      127.0.0.1:9002
backend legacy 10.0.0.7:8443 send-proxy v2
pool web {
    member a weight 3
    member b
}
rule api: sni exact "api.example.com" and dport 443 -> forward(legacy)
alpn ["h2", "http/1.1"] and sni suffix ".secure.example.com" -> terminate tls then forward(web)
sni suffix ".apps.example.com" -> plugin(redis_sni)
sni suffix ".example.com" -> lb(a:3, b:1)
sni suffix ".example.org" and not src [10.0.0.0/8, 2001:db8::/32] -> lb(web, algo=hash(src))
sni glob "*.internal.*" or (proto udp and dport [53, 5000..5010]) -> reject
proto udp and dport 5353 -> forward(b)
sni suffix [".one.test", ".two.test"] -> forward(a)
not (sni glob "**.deep.test" and src 192.168.0.0/16) and sni glob "x.**.deep.test" -> forward(b)
sni suffix ".late.test" -> plugin(redis_sni)
src [192.0.2.0/24, 2001:db8::/32] and dport 22 -> reject
"""


@pytest.fixture(scope="module")
def rules():
    return dynproxy.lang.load_text(RULES, "main.rules")


def conn(sni=None, src="10.1.2.3", dport=443, proto="tcp", alpn=()):
    return ConnInfo(proto, src, dport, sni, tuple(alpn))


def skips(explanation):
    return [f"#{s.number} {s}" for s in explanation.skipped]


def test_an_earlier_rule_fails_on_its_first_false_atom(rules):
    e = explain(rules, conn("api.example.com", dport=8443))
    assert e.decision.describe() == "lb(a:3, b:1)"
    assert (e.deciding.number, e.deciding.rule.pos.line) == (4, 11)
    assert skips(e) == [
        "#1 main.rules:8: dport 443: the connection's port is 8443",
        "#2 main.rules:9: alpn [\"h2\", \"http/1.1\"]: the connection offers no ALPN",
        "#3 main.rules:10: sni suffix \".apps.example.com\": 'api.example.com' does not end "
        "in '.apps.example.com'",
    ]


def test_the_apex_is_not_matched_by_its_suffix(rules):
    e = explain(rules, conn("example.com"))
    assert "#4 main.rules:11: sni suffix \".example.com\": 'example.com' is the apex, a suffix " \
        "needs at least one more label" in skips(e)
    assert e.decision is NO_MATCH and e.steps == ()
    assert [s.number for s in e.skipped] == list(range(1, len(rules.rules) + 1))


def test_no_sni_and_udp(rules):
    e = explain(rules, conn(None, proto="udp", dport=5353))
    assert e.decision.describe() == "forward(b)"
    assert skips(e)[0] == ("#1 main.rules:8: sni exact \"api.example.com\": "
                           "the connection has no SNI (not TLS or UDP)")
    assert skips(e)[-1] == ("#6 main.rules:13: sni glob \"*.internal.*\": the connection has "
                            "no SNI (not TLS or UDP); dport [53, 5000..5010]: the connection's "
                            "port is 5353")


def test_a_negated_atom_that_holds(rules):
    e = explain(rules, conn("a.example.org", src="10.9.9.9"))
    assert "#5 main.rules:12: not src [10.0.0.0/8, 2001:db8::/32]: 10.9.9.9 is in 10.0.0.0/8" \
        in skips(e)
    mapped = explain(rules, conn("a.example.org", src="::ffff:10.9.9.9"))
    assert "#5 main.rules:12: not src [10.0.0.0/8, 2001:db8::/32]: 10.9.9.9 is in 10.0.0.0/8" \
        in skips(mapped)


def test_a_negated_and_names_each_true_atom(rules):
    e = explain(rules, conn("x.a.deep.test", src="192.168.1.1"))
    assert ("#9 main.rules:16: not sni glob \"**.deep.test\": the SNI 'x.a.deep.test' matches "
            "'**.deep.test'; not src 192.168.0.0/16: 192.168.1.1 is in 192.168.0.0/16") in skips(e)
    assert explain(rules, conn("x.a.deep.test", src="10.0.0.1")).deciding.number == 9


def test_glob_star_is_one_label(rules):
    e = explain(rules, conn("a.b.internal.c"))
    assert ("#6 main.rules:13: sni glob \"*.internal.*\": 'a.b.internal.c' has more labels than "
            "'*.internal.*' allows ('*' is exactly one label, '**' one or more); "
            "proto udp: the connection is tcp") in skips(e)


def test_sets_of_suffixes(rules):
    e = explain(rules, conn("one.test"))
    assert "#8 main.rules:15: sni suffix [\".one.test\", \".two.test\"]: 'one.test' is the apex, " \
        "a suffix needs at least one more label" in skips(e)
    e = explain(rules, conn("x.three.test"))
    assert "#8 main.rules:15: sni suffix [\".one.test\", \".two.test\"]: 'x.three.test' does " \
        "not end in any of '.one.test', '.two.test'" in skips(e)


def test_alpn_offered_but_not_listed_and_missing_facts(rules):
    e = explain(rules, conn("a.secure.example.com", alpn=["spdy/3"], src=None, dport=None))
    assert skips(e)[:2] == [
        "#1 main.rules:8: sni exact \"api.example.com\": the SNI is 'a.secure.example.com'",
        "#2 main.rules:9: alpn [\"h2\", \"http/1.1\"]: the client offers 'spdy/3', none of them "
        "listed",
    ]
    e = explain(rules, conn("api.example.com", dport=None))
    assert skips(e)[0] == "#1 main.rules:8: dport 443: no destination port was given"
    # No source address: `not src [...]` holds, so rule 5 decides.
    assert explain(rules, conn("a.example.org", src=None)).deciding.number == 5
    e = explain(rules, conn(None, src=None, dport=22))
    assert skips(e)[-1] == ("#11 main.rules:18: src [192.0.2.0/24, 2001:db8::/32]: "
                            "no source address was given")
    e = explain(rules, conn(None, src="::ffff:8.8.8.8", dport=22))
    assert skips(e)[-1] == ("#11 main.rules:18: src [192.0.2.0/24, 2001:db8::/32]: 8.8.8.8 is "
                            "not in any of 192.0.2.0/24, 2001:db8::/32")


def test_a_plugin_rule_is_a_step_with_no_opinion(rules):
    e = explain(rules, conn("x.apps.example.com"))
    assert [(s.number, s.decision.describe()) for s in e.steps] == [
        (3, "plugin(redis_sni)"), (4, "lb(a:3, b:1)")]
    assert [s.number for s in e.plugins] == [3]
    assert e.decision.describe() == "lb(a:3, b:1)"
    assert [s.number for s in e.skipped] == [1, 2]


def test_a_plugin_with_nothing_after_it(rules):
    e = explain(rules, conn("a.late.test"))
    assert [s.number for s in e.steps] == [10]
    assert e.deciding is None and e.decision is NO_MATCH
    assert [s.number for s in e.skipped] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]


def test_default_and_empty_rule_sets():
    rules = dynproxy.lang.load_text("backend a 127.0.0.1:1\ndefault -> forward(a)\n", "d.rules")
    e = explain(rules, conn(None))
    assert e.deciding.number == 1 and e.skipped == ()
    unmatched = dynproxy.lang.load_text('backend a 127.0.0.1:1\nsni exact "y.test" -> forward(a)\n',
                                        "e.rules")
    assert explain(unmatched, conn("x.test")).decision is NO_MATCH
    with pytest.raises(dynproxy.lang.RulesError, match="E219"):  # no rules at all: refused
        dynproxy.lang.load_text("backend a 127.0.0.1:1\n", "e.rules")


def test_atom_text_reads_like_the_source(rules):
    atoms = [atom_text(a) for r in rules.rules for a in iter_atoms(r.cond)]
    assert atoms[:4] == ['sni exact "api.example.com"', "dport 443", 'alpn ["h2", "http/1.1"]',
                         'sni suffix ".secure.example.com"']
    assert "dport [53, 5000..5010]" in atoms and "proto udp" in atoms


HUGE_DNF = " and ".join(f'(sni suffix ".s{i}.test" or dport {1000 + i})' for i in range(8))


@pytest.mark.parametrize("seed", range(5))
def test_explanations_agree_with_the_router(rules, seed):
    """Random connections: every skipped rule really is false, and no reason is 'internal'."""
    rng = random.Random(seed)
    names = ["api.example.com", "example.com", "x.apps.example.com", "a.example.org",
             "a.b.internal.c", "q.internal.z", "x.one.test", "x.a.deep.test", "a.late.test",
             None, "s1.s2.test"]
    for _ in range(300):
        c = conn(rng.choice(names), src=rng.choice(["10.1.2.3", "192.168.5.5", "2001:db8::1",
                                                     "8.8.8.8", None]),
                 dport=rng.choice([53, 443, 1003, 5005, 5353, None]),
                 proto=rng.choice(["tcp", "udp"]), alpn=rng.choice([(), ("h2",), ("x",)]))
        _check_consistent(rules, c)


def test_explanations_agree_on_a_rule_too_big_for_dnf():
    rules = dynproxy.lang.load_text(f"backend a 127.0.0.1:1\n{HUGE_DNF} -> forward(a)\n", "h.rules")
    rng = random.Random(7)
    for _ in range(300):
        sni = ".".join(rng.sample([f"s{i}" for i in range(8)], 2)) + ".test"
        _check_consistent(rules, conn(sni, dport=rng.choice([1000 + i for i in range(8)])))


def _check_consistent(rules, c):
    e = explain(rules, c)
    ip = parse_src(c.src)
    for s in e.skipped:
        assert not holds(s.rule.cond, c, ip)
        assert s.reasons and all(r.condition != "internal" for r in s.reasons)
    for step in e.steps:
        assert step.rule.cond is None or holds(step.rule.cond, c, ip)
    if not e.plugins:
        assert e.decision == rules.decide_conn(c)
