"""Rule text -> RuleFile (frozen AST), with syntax errors a person can read.

Lark parses with LALR and the contextual lexer; a separate pass turns the parse
tree into lang.ast nodes carrying file/line/column (Lark's inline transformer
cannot carry positions). Parsing never raises anything but RulesError. No I/O:
callers hand in the text.
"""

from __future__ import annotations

import functools
from importlib import resources
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from dynproxy.lang import ast
from dynproxy.lang.diagnostics import Diagnostic, RulesError, error, help_
from dynproxy.lang.syntax_errors import describe_syntax_error

MAX_NESTING = 64
GRAMMAR_FILE = "dynproxy.lark"


def grammar_text() -> str:
    """The grammar shipped in the wheel (dynproxy.grammar), or the source tree's."""
    try:
        return resources.files("dynproxy.grammar").joinpath(GRAMMAR_FILE).read_text("utf-8")
    except (ModuleNotFoundError, FileNotFoundError):
        repo = Path(__file__).resolve().parents[2] / "grammar" / GRAMMAR_FILE
        return repo.read_text("utf-8")


@functools.cache
def lark_parser() -> Lark:
    return Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=True,
    )


def parse_text(text: str, path: str = "<rules>") -> ast.RuleFile:
    """Parse one file's text; raises RulesError with a syntax diagnostic."""
    too_deep = _nesting_error(text, path)
    if too_deep:
        raise RulesError([too_deep], {path: text})
    try:
        tree = lark_parser().parse(text)
        return ToAst(path, text).transform(tree)
    except UnexpectedInput as exc:
        raise RulesError([_syntax_diagnostic(exc, text, path)], {path: text}) from None
    except RecursionError:  # e.g. thousands of chained `not`
        pos = ast.Pos(path, 1, 1, 1, 1)
        raise RulesError([error("E101", "a condition is nested too deeply to read", pos,
                                help_("split it into several rules"))], {path: text}) from None


def _syntax_diagnostic(exc: UnexpectedInput, text: str, path: str) -> Diagnostic:
    message, hints = describe_syntax_error(exc, text, lark_parser())
    line, col, width = _error_span(exc, text)
    pos = ast.Pos(path, line, col, line, col + width)
    return error("E100", message, pos, *(help_(h) for h in hints))


def _error_span(exc: UnexpectedInput, text: str) -> tuple[int, int, int]:
    if isinstance(exc, UnexpectedToken) and exc.token.type != "$END":
        tok = exc.token
        return tok.line, tok.column, max(1, len(str(tok)))
    if isinstance(exc, (UnexpectedEOF, UnexpectedToken)):
        lines = text.splitlines() or [""]
        return len(lines), len(lines[-1]) + 1, 1
    if isinstance(exc, UnexpectedCharacters):
        return exc.line, exc.column, 1
    return getattr(exc, "line", 1) or 1, getattr(exc, "column", 1) or 1, 1


def _nesting_error(text: str, path: str) -> Diagnostic | None:
    """Refuse absurd parenthesis nesting before the recursive tree pass sees it."""
    if text.count("(") <= MAX_NESTING:
        return None
    depth, line, col, in_str, in_comment = 0, 1, 0, False, False
    prev = ""
    for ch in text:
        col += 1
        if ch == "\n":
            line, col, in_comment = line + 1, 0, False
        elif in_comment:
            pass
        elif in_str:
            in_str = not (ch == '"' and prev != "\\")
        elif ch == '"':
            in_str = True
        elif ch == "#":
            in_comment = True
        elif ch == "(":
            depth += 1
            if depth > MAX_NESTING:
                pos = ast.Pos(path, line, col, line, col + 1)
                return error(
                    "E101",
                    f"parentheses nested deeper than {MAX_NESTING} levels",
                    pos,
                    help_("split the condition into several rules, or flatten it"),
                )
        elif ch == ")":
            depth = max(0, depth - 1)
        prev = ch
    return None


def unescape(literal: str) -> str:
    """The value of an ESCAPED_STRING token: quotes removed, \\n \\r \\t \\\\ \\" \\xHH."""
    body, out, i = literal[1:-1], [], 0
    if "\\" not in body:
        return body
    simple = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\", '"': '"', "0": "\0"}
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt == "x" and i + 3 < len(body) + 1:
                try:
                    out.append(chr(int(body[i + 2 : i + 4], 16)))
                    i += 4
                    continue
                except ValueError:
                    pass
            out.append(simple.get(nxt, "\\" + nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def parse_duration(text: str) -> float:
    """'500ms' | '2s' | '1m' -> seconds."""
    for suffix, scale in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(suffix):
            return int(text[: -len(suffix)]) * scale
    raise ValueError(text)


def split_endpoint(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


@v_args(meta=True)
class ToAst(Transformer):
    """Parse tree -> lang.ast, one method per grammar rule."""

    def __init__(self, path: str, text: str):
        super().__init__()
        self.path = path
        self.text = text

    # positions -------------------------------------------------------------------
    def _pos(self, meta) -> ast.Pos:
        if getattr(meta, "empty", True):
            return ast.Pos(self.path, 1, 1, 1, 1)
        return ast.Pos(self.path, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tpos(self, tok: Token) -> ast.Pos:
        return ast.Pos(self.path, tok.line, tok.column, tok.end_line, tok.end_column)

    def _ref(self, tok: Token) -> ast.Ref:
        return ast.Ref(str(tok), self._tpos(tok))

    def _item(self, tok: Token) -> ast.Item:
        value = unescape(str(tok)) if tok.type == "STRING" else str(tok)
        return ast.Item(value, self._tpos(tok))

    # file ------------------------------------------------------------------------
    def start(self, meta, items):
        return ast.RuleFile(self.path, tuple(items))

    def include(self, meta, children):
        return ast.Include(unescape(str(children[0])), self._pos(meta))

    # declarations ----------------------------------------------------------------
    def backend_decl(self, meta, children):
        name, endpoint, *opts = children
        options = dict(opts)
        return ast.BackendDecl(
            name=str(name),
            name_pos=self._tpos(name),
            endpoint=self._endpoint(endpoint),
            weight=options.get("weight"),
            send_proxy=options.get("send_proxy"),
            tls=options.get("tls"),
            pos=self._pos(meta),
        )

    def _endpoint(self, tok: Token) -> ast.Endpoint:
        host, port = split_endpoint(str(tok))
        return ast.Endpoint(host, port, self._tpos(tok))

    def weight(self, meta, children):
        return ("weight", int(children[0]))

    def send_proxy(self, meta, children):
        return ("send_proxy", str(children[0]))

    def backend_tls(self, meta, children):
        opts = dict(children)
        tls = ast.BackendTls(
            ca=opts.get("ca"), sni=opts.get("sni"), verify=opts.get("verify", True),
            pos=self._pos(meta),
        )
        return ("tls", tls)

    def tls_ca(self, meta, children):
        return ("ca", unescape(str(children[0])))

    def tls_sni(self, meta, children):
        return ("sni", unescape(str(children[0])))

    def tls_noverify(self, meta, children):
        return ("verify", False)

    def pool_decl(self, meta, children):
        name, *stmts = children
        kinds = {ast.Member: [], ast.RedisMembers: [], ast.HealthCheck: [], ast.Algo: [],
                 ast.Ref: []}
        for stmt in stmts:
            kinds[type(stmt)].append(stmt)
        return ast.PoolDecl(
            name=str(name),
            name_pos=self._tpos(name),
            members=tuple(kinds[ast.Member]),
            redis=tuple(kinds[ast.RedisMembers]),
            health=kinds[ast.HealthCheck][-1] if kinds[ast.HealthCheck] else None,
            balance=kinds[ast.Algo][-1] if kinds[ast.Algo] else None,
            fallback=kinds[ast.Ref][-1] if kinds[ast.Ref] else None,
            pos=self._pos(meta),
        )

    def member(self, meta, children):
        target, weight = children
        is_endpoint = target.type == "ENDPOINT"
        return ast.Member(
            ref=None if is_endpoint else self._ref(target),
            endpoint=self._endpoint(target) if is_endpoint else None,
            weight=None if weight is None else int(weight),
            pos=self._pos(meta),
        )

    def members_from(self, meta, children):
        return ast.RedisMembers(unescape(str(children[0])), self._pos(meta))

    def health(self, meta, children):
        kind, *opts = children
        o = dict(opts)
        send, expect = o.get("probe", (None, None))
        return ast.HealthCheck(
            kind=str(kind), interval=o.get("interval"), timeout=o.get("timeout"),
            rise=o.get("rise"), fall=o.get("fall"), send=send, expect=expect,
            pos=self._pos(meta),
        )

    def hc_interval(self, meta, c):
        return ("interval", parse_duration(str(c[0])))

    def hc_timeout(self, meta, c):
        return ("timeout", parse_duration(str(c[0])))

    def hc_rise(self, meta, c):
        return ("rise", int(c[0]))

    def hc_fall(self, meta, c):
        return ("fall", int(c[0]))

    def hc_probe(self, meta, c):
        return ("probe", (unescape(str(c[0])), unescape(str(c[1]))))

    def balance(self, meta, children):
        return children[0]

    def fallback(self, meta, children):
        return self._ref(children[0])

    def wrr(self, meta, c):
        return ast.Algo("wrr", None, self._pos(meta))

    def least_conn(self, meta, c):
        return ast.Algo("least_conn", None, self._pos(meta))

    def hash(self, meta, c):
        return ast.Algo("hash", str(c[0]), self._pos(meta))

    # rules -------------------------------------------------------------------------
    def rule(self, meta, children):
        name, cond, _arrow, action = children
        return self._rule(meta, name, cond, action)

    def default_rule(self, meta, children):
        _default, _arrow, action = children
        return self._rule(meta, None, None, action)

    def _rule(self, meta, name, cond, action):
        pos = self._pos(meta)
        return ast.Rule(
            name=None if name is None else str(name),
            name_pos=None if name is None else self._tpos(name),
            cond=cond,
            action=action,
            text=self.text[meta.start_pos : meta.end_pos],
            pos=pos,
        )

    # conditions --------------------------------------------------------------------
    def or_cond(self, meta, children):
        return ast.Or(tuple(children), self._pos(meta))

    def and_cond(self, meta, children):
        return ast.And(tuple(children), self._pos(meta))

    def neg(self, meta, children):
        return ast.Not(children[1], self._pos(meta))

    def group(self, meta, children):
        return children[1]

    def sni(self, meta, children):
        op, items = children
        return ast.Sni(str(op), items, self._pos(meta))

    def src(self, meta, children):
        return ast.Src(children[0], self._pos(meta))

    def dport(self, meta, children):
        return ast.Dport(children[0], self._pos(meta))

    def proto(self, meta, children):
        return ast.Proto(str(children[0]), self._pos(meta))

    def alpn(self, meta, children):
        return ast.Alpn(children[0], self._pos(meta))

    def str_set(self, meta, children):
        return tuple(self._item(t) for t in children if t is not None)

    addr_set = str_set

    def port_set(self, meta, children):
        return tuple(c for c in children if c is not None)

    def port_item(self, meta, children):
        lo, hi = children
        return ast.PortRange(int(lo), int(hi if hi is not None else lo), self._pos(meta))

    # actions -----------------------------------------------------------------------
    def forward(self, meta, children):
        return ast.Forward(self._ref(children[0]), self._pos(meta))

    def plugin(self, meta, children):
        return ast.Plugin(self._ref(children[0]), self._pos(meta))

    def lb(self, meta, children):
        *targets, algo = children
        return ast.Lb(tuple(targets), algo, self._pos(meta))

    def lb_target(self, meta, children):
        name, weight = children
        w = None if weight is None else int(weight)
        return ast.LbTarget(self._ref(name), w, self._pos(meta))

    def reject(self, meta, children):
        return ast.Reject(self._pos(meta))

    def terminate(self, meta, children):
        cert, alpn, then = children
        return ast.Terminate(
            cert=None if cert is None else self._ref(cert),
            alpn=alpn,
            then=then,
            pos=self._pos(meta),
        )

    def __default__(self, data, children, meta):  # pragma: no cover - grammar/AST drift
        raise AssertionError(f"no AST conversion for grammar rule {data!r}")


def is_tree(x) -> bool:
    return isinstance(x, Tree)
