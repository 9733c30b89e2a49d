"""Turn Lark's parse exceptions into sentences an operator understands.

Lark reports "Unexpected token Token('NAME', 'x'), expected one of {ARROW, __ANON_3}";
an operator needs "expected '->' after the condition". This module only formats:
no I/O, no parsing of its own.
"""

from __future__ import annotations

from lark import Lark
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.lexer import PatternStr

HUMAN = {
    "NAME": "a name",
    "STRING": 'a quoted string like "example.com"',
    "ENDPOINT": "an address HOST:PORT (IPv6 as [ADDR]:PORT)",
    "ADDR": "an IP address or CIDR like 10.0.0.0/8",
    "INT": "a number",
    "DURATION": "a duration like 2s, 500ms or 1m",
    "SNI_OP": "exact, prefix, suffix or glob",
    "PROTO": "tcp or udp",
    "HC_KIND": "tcp or tls",
    "HASH_KEY": "src or sni",
    "PPV": "v1 or v2",
    "$END": "end of file",
}

ITEM_STARTS = {"include", "backend", "pool", "rule", "default", "sni", "src", "dport", "proto"}
CONDITION_STARTS = {"sni", "src", "dport", "proto", "alpn", "not", "("}
ACTIONS = {"forward", "lb", "reject", "terminate", "plugin"}


def describe_syntax_error(exc: UnexpectedInput, text: str, parser: Lark) -> tuple[str, list[str]]:
    """(message, help lines) for a Lark parse exception."""
    if isinstance(exc, UnexpectedCharacters):
        return _unexpected_chars(exc, text)
    expected = _expected_words(getattr(exc, "expected", None) or set(), parser)
    if isinstance(exc, UnexpectedEOF) or (
        isinstance(exc, UnexpectedToken) and exc.token.type == "$END"
    ):
        return "the file ends in the middle of a statement", _hints(expected)
    found = _describe_token(exc.token)
    return f"unexpected {found}", _hints(expected, str(exc.token))


def _unexpected_chars(exc: UnexpectedCharacters, text: str) -> tuple[str, list[str]]:
    ch = text[exc.pos_in_stream] if 0 <= exc.pos_in_stream < len(text) else ""
    if ch == '"':
        return "unterminated string", ['close the string with " on the same line']
    if ch in "\x00\ufffd" or (ch and not ch.isprintable() and not ch.isspace()):
        return f"unexpected character {ch!r}: this does not look like a rule file", [
            "rule files are UTF-8 text; see docs/rules.md for the syntax"
        ]
    allowed = sorted(HUMAN.get(a, a) for a in (exc.allowed or ()))[:6]
    word = _word_at(text, exc.pos_in_stream)
    hints = [f"expected {_join(allowed)}"] if allowed else []
    return f"unexpected {word!r}", hints


def _word_at(text: str, pos: int) -> str:
    end = pos
    while end < len(text) and end - pos < 40 and not text[end].isspace():
        end += 1
    return text[pos:end] or text[pos : pos + 1]


def _describe_token(tok) -> str:
    value = str(tok)
    if tok.type == "STRING":
        return f"string {value}"
    return f"{value!r}"


def _expected_words(expected: set[str], parser: Lark) -> set[str]:
    words = set()
    by_name = {t.name: t for t in parser.terminals}
    for name in expected:
        term = by_name.get(name)
        if term is not None and isinstance(term.pattern, PatternStr):
            words.add(term.pattern.value)
        else:
            words.add(HUMAN.get(name, name))
    return words


def _hints(expected: set[str], found: str = "") -> list[str]:
    if not expected:
        return []
    if ITEM_STARTS <= expected:
        return [
            "expected a declaration (backend, pool, include) or a rule: "
            "a condition, '->', then an action",
        ] + _keyword_hint(found)
    if ACTIONS <= expected:
        return ["expected an action: forward(NAME), lb(NAME:WEIGHT, ...), reject, "
                "terminate tls then ..., or plugin(NAME)"] + _keyword_hint(found)
    if CONDITION_STARTS <= expected:
        return ["expected a condition: sni, src, dport, proto, alpn, not, or '('"]
    if "->" in expected:
        return ["expected '->' and an action after the condition"
                + (", or 'and' / 'or' to combine conditions" if "and" in expected else "")]
    return [f"expected {_join(sorted(_quote(w) for w in expected)[:8])}"]


def _keyword_hint(found: str) -> list[str]:
    import difflib

    words = sorted(ITEM_STARTS | ACTIONS | CONDITION_STARTS - {"("})
    close = difflib.get_close_matches(found, words, n=1, cutoff=0.6)
    return [f"did you mean {close[0]!r}?"] if close and close[0] != found else []


def _quote(word: str) -> str:
    return word if " " in word else f"'{word}'"


def _join(words: list[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " or " + words[-1]
