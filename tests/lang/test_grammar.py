"""The grammar itself: no LALR conflicts and no terminal collisions (Lark strict mode,
which uses interegular to compare the terminals' regular expressions)."""

import interegular  # noqa: F401 - strict mode checks collisions only when it is installed
from lark import Lark

from dynproxy.lang import load_text
from dynproxy.lang.parser import grammar_text


def test_grammar_is_conflict_free_in_strict_mode():
    Lark(grammar_text(), parser="lalr", lexer="contextual", strict=True)


def test_backend_tls_options_do_not_swallow_the_next_rule():
    # `sni` used to be a tls option too: the parser shifted it and broke the next rule.
    rules = load_text('backend b 127.0.0.1:1 tls\nsni exact "a.test" -> forward(b)\n'
                      'backend c 127.0.0.1:2 tls servername "c.internal" noverify\n'
                      "default -> forward(c)\n")
    assert rules.decide(sni="a.test").targets[0].name == "b"
    assert rules.backends["c"].tls.sni == "c.internal" and not rules.backends["c"].tls.verify
