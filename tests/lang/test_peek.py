"""Which listener ports wait for the ClientHello (server-speaks-first protocols must not)."""

from dynproxy.lang import load_text
from dynproxy.lang.peek import PeekPolicy

BACKENDS = "backend a 127.0.0.1:1\npool h { member a\n balance hash(sni) }\n"


def policy(rules: str) -> PeekPolicy:
    return PeekPolicy(load_text(BACKENDS + rules))


def test_only_ports_where_an_sni_rule_can_match_are_peeked():
    p = policy('dport 25 -> forward(a)\nsni suffix ".x.test" and dport 443 -> forward(a)\n'
               "default -> forward(a)\n")
    assert p.anywhere and p.needed(443) and not p.needed(25) and not p.needed(3306)


def test_unknown_facts_count_as_possibly_true():
    p = policy('not dport 443 or sni exact "a.test" -> forward(a)\ndefault -> forward(a)\n')
    assert p.needed(443) and p.needed(25)  # `sni` may decide on any port


def test_udp_only_sni_free_and_hashing_rules():
    assert not policy("proto udp -> forward(a)\ndefault -> forward(a)\n").anywhere
    assert not policy('proto udp and alpn ["h2"] -> forward(a)\ndefault -> forward(a)\n').needed(80)
    assert policy("dport 8443 -> forward(h)\ndefault -> forward(a)\n").needed(8443)
    assert not policy("dport 8443 -> forward(h)\ndefault -> forward(a)\n").needed(80)
    assert policy("default -> lb(a, algo=hash(sni))\n").needed(1)
