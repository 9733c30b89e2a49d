"""`dynproxy repl --rules FILE` as a real subprocess with input piped in (and once on a
pseudo-terminal): decisions, skip reasons, session edits, reload, lint, listings, bad
queries, garbage input, and rule files that do not load."""

from __future__ import annotations

import os
import pty
import select
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dynproxy.cli.repl import candidates, failure_summary
from dynproxy.cli.repl_console import Console
from dynproxy.cli.repl_session import Session

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
REPL = [sys.executable, "-m", "dynproxy", "repl", "--rules"]


def _env(home: Path | None = None) -> dict:
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    if home is not None:
        env["HOME"] = str(home)
    return env


def repl(lines: str | bytes, rules: str = "main.rules", cwd: Path = FIXTURES):
    data = lines.encode() if isinstance(lines, str) else lines
    return subprocess.run([*REPL, rules], input=data, cwd=cwd, env=_env(),
                          capture_output=True, timeout=60)


def answers(lines: str | bytes, failed: tuple[int, ...] = (), **kw) -> list[str]:
    """The answer blocks of a script; `failed` is the input lines that must fail (exit 1
    and stderr naming them); none may fail otherwise (exit 0, stderr empty)."""
    done = repl(lines, **kw)
    if failed:
        assert done.returncode == 1, done.stderr.decode()
        assert done.stderr.decode() == failure_summary(list(failed)) + "\n"
    else:
        assert done.returncode == 0, done.stderr.decode()
        assert done.stderr == b""
    out = done.stdout.decode()
    assert out.endswith("\n") and "Traceback" not in out
    return out[:-1].split("\n\n")


# --- queries ---------------------------------------------------------------------------


def test_a_query_shows_the_decision_the_rule_and_why_earlier_rules_were_skipped():
    [block] = answers("sni=api.example.com src=10.1.2.3 dport=8443 proto=tcp\n")
    assert block.splitlines() == [
        "decision: lb(a:3, b:1)",
        'rule: #4 main.rules:18: sni suffix ".example.com" -> lb(a:3, b:1)',
        "skipped: #1 main.rules:15: dport 443: the connection's port is 8443",
        'skipped: #2 main.rules:16: alpn ["h2", "http/1.1"]: the connection offers no ALPN',
        "skipped: #3 main.rules:17: sni suffix \".apps.example.com\": 'api.example.com' does not "
        "end in '.apps.example.com'",
    ]


def test_one_answer_per_query_with_comments_and_blank_lines_ignored():
    blocks = answers("# a comment\n\nsni=api.example.com dport=443\n   \n"
                     "  # another\nsni=API.Example.COM. dport=443 alpn=h2,http/1.1\n")
    assert len(blocks) == 2
    for block in blocks:
        assert block.splitlines() == [
            "decision: forward(legacy)",
            'rule: #1 main.rules:15: rule api: sni exact "api.example.com" and dport 443 '
            "-> forward(legacy)",
        ]


def test_the_apex_of_a_suffix_and_no_match():
    [block] = answers("sni=example.com src=10.1.2.3 dport=443\n")
    lines = block.splitlines()
    assert lines[:2] == ["decision: reject", "no rule matched: the connection is rejected "
                         "(add a `default -> ...` rule)"]
    assert "skipped: #4 main.rules:18: sni suffix \".example.com\": 'example.com' is the apex, " \
        "a suffix needs at least one more label" in lines
    assert lines[-1] == "skipped: #8 rules.d/shop.rules:2: sni glob \"*.shop.test\": " \
        "'example.com' does not match '*.shop.test'"
    assert len(lines) == 2 + 8


def test_udp_has_no_sni_and_a_negated_source():
    udp, org = answers("proto=udp dport=5353\nsni=a.example.org src=::ffff:10.9.9.9\n")
    assert udp.splitlines()[:2] == [
        "decision: forward(b)", "rule: #7 main.rules:21: proto udp and dport 5353 -> forward(b)"]
    assert udp.splitlines()[2] == ('skipped: #1 main.rules:15: sni exact "api.example.com": '
                                   "the connection has no SNI (not TLS or UDP)")
    assert udp.splitlines()[-1] == (
        'skipped: #6 main.rules:20: sni glob "*.internal.*": the connection has no SNI (not TLS '
        "or UDP); dport [53, 5000..5010]: the connection's port is 5353")
    assert "skipped: #5 main.rules:19: not src [10.0.0.0/8, 2001:db8::/32]: 10.9.9.9 is in " \
        "10.0.0.0/8" in org.splitlines()


def test_a_plugin_rule_says_what_happens_when_the_plugin_has_no_opinion():
    [block] = answers("sni=x.apps.example.com dport=443\n")
    assert block.splitlines() == [
        "decision: plugin(redis_sni): would consult plugin 'redis_sni' (plugins are not run "
        "in the REPL)",
        'rule: #3 main.rules:17: sni suffix ".apps.example.com" -> plugin(redis_sni)',
        "if plugin 'redis_sni' has no opinion: lb(a:3, b:1)",
        'rule: #4 main.rules:18: sni suffix ".example.com" -> lb(a:3, b:1)',
        'skipped: #1 main.rules:15: sni exact "api.example.com": the SNI is \'x.apps.example.com\'',
        'skipped: #2 main.rules:16: alpn ["h2", "http/1.1"]: the connection offers no ALPN',
    ]


BAD_QUERIES = [
    ("snii=a.example.com", "error: unknown key 'snii' (did you mean sni=?); keys are sni=, src=, "
     "dport=, proto=, alpn="),
    ("sni", "error: 'sni' is not KEY=VALUE; a query looks like `sni=api.example.com dport=443` "
     "(:help)"),
    ("dport=99999", "error: dport='99999' is not a port; write a number in 1..65535"),
    ("dport=https", "error: dport='https' is not a port; write a number in 1..65535"),
    ("proto=sctp", "error: proto='sctp': write proto=tcp or proto=udp"),
    ("src=10.1.2", "error: src='10.1.2' is not an IP address; write e.g. src=10.1.2.3 or "
     "src=2001:db8::1 (no port)"),
    ("sni=a.test sni=b.test", "error: sni= is given twice"),
    ("sni=", "error: sni= has no value; leave sni= out if the connection has none"),
    ("alpn=,", "error: alpn=',' names no protocol; write e.g. alpn=h2,http/1.1"),
    ("proto=udp sni=a.test", "error: UDP datagrams carry no SNI or ALPN; drop sni=/alpn= or "
     "use proto=tcp"),
    (":rule", "error: unknown command ':rule' (did you mean :rules?); :help lists the commands"),
    (":drop", "error: `:drop N` takes a rule number (:rules lists them)"),
    (":drop 42", "error: there is no rule 42; rule numbers are 1..8 (:rules)"),
    (":rules all", "error: `:rules` takes no arguments"),
    ("x" * 5000, "error: " + repr("x" * 5000)[:55] + "...' is not KEY=VALUE; a query looks like "
     "`sni=api.example.com dport=443` (:help)"),
]


@pytest.fixture(scope="module")
def bad_query_answers() -> dict[str, tuple[str, str]]:
    """One REPL for every bad line, each followed by a good query: line -> (answer, next)."""
    script = "".join(f"{line}\nsni=api.example.com dport=443\n" for line, _ in BAD_QUERIES)
    blocks = answers(script, failed=tuple(range(1, 2 * len(BAD_QUERIES), 2)))
    assert len(blocks) == 2 * len(BAD_QUERIES)
    return {line: (blocks[2 * i], blocks[2 * i + 1]) for i, (line, _) in enumerate(BAD_QUERIES)}


@pytest.mark.parametrize(("line", "error"), BAD_QUERIES, ids=[q[:20] for q, _ in BAD_QUERIES])
def test_a_bad_line_gets_a_one_line_error_and_the_session_goes_on(bad_query_answers, line, error):
    bad, good = bad_query_answers[line]
    assert bad == error
    assert good.startswith("decision: forward(legacy)\n")


def test_garbage_bytes_never_crash_the_session():
    garbage = (b"\xff\xfe\x00garbage\n\x00\x01\x02\n" + bytes(range(11, 256)) + b"\n"
               + b"sni=" + b"a" * 200_000 + b"\n" + b"sni=\xc3(\n" + b":add \x00 -> (((\n"
               + b"sni=api.example.com dport=443\n")
    blocks = answers(garbage, failed=(1, 2, 3, 4, 5, 6))
    assert blocks[0] == "error: line 1 is not UTF-8 text (byte 0xff at offset 0); skipped"
    assert blocks[1].startswith("error: '\\x00\\x01\\x02' is not KEY=VALUE")
    assert blocks[2] == "error: line 3 is not UTF-8 text (byte 0x80 at offset 117); skipped"
    assert blocks[3] == "error: line 4 is longer than 65536 bytes; skipped"
    assert blocks[4] == "error: line 5 is not UTF-8 text (byte 0xc3 at offset 4); skipped"
    assert "error[E100]" in blocks[5] and blocks[5].endswith("nothing changed")
    assert blocks[6].startswith("decision: forward(legacy)\n")
    assert len(blocks) == 7


def test_quit_ends_the_session_and_input_after_it_is_not_read():
    assert len(answers("sni=api.example.com dport=443\n:quit\nsni=never.test\n")) == 1
    done = repl(":q\n:rules\n")
    assert (done.returncode, done.stdout, done.stderr) == (0, b"", b"")


def test_a_script_with_a_failed_line_answers_every_line_and_exits_1():
    script = ("# a CI check\nsni=api.example.com dport=443\nsni=nowhere.test\n"
              ":drop 42\n\nsni=api.example.com dport=443\n:rules x\n")
    blocks = answers(script, failed=(4, 7))
    assert blocks[0].startswith("decision: forward(legacy)\n")
    assert blocks[1].startswith("decision: reject\nno rule matched")  # a decision, no failure
    assert blocks[2] == "error: there is no rule 42; rule numbers are 1..8 (:rules)"
    assert blocks[3].startswith("decision: forward(legacy)\n")
    assert blocks[4] == "error: `:rules` takes no arguments"
    assert len(blocks) == 5


def test_a_failed_line_before_quit_still_fails_the_script():
    assert answers("snii=a.test\n:quit\nsnii=never.read\n", failed=(1,)) == [
        "error: unknown key 'snii' (did you mean sni=?); keys are sni=, src=, dport=, proto=, "
        "alpn="]


def test_stderr_names_at_most_twenty_failed_lines():
    done = repl("snii=x\n" * 25)
    assert done.returncode == 1
    assert done.stdout.decode().count("error: unknown key 'snii'") == 25
    assert done.stderr.decode() == ("dynproxy repl: 25 lines failed (input lines "
                                    + ", ".join(map(str, range(1, 21))) + ", ...)\n")


def test_answers_that_cannot_be_written_end_the_session_without_a_traceback(tmp_path):
    queries = tmp_path / "queries"
    queries.write_text("sni=api.example.com dport=443\n" * 2000)
    with open(queries, "rb") as stdin, open("/dev/full", "wb") as full:
        done = subprocess.run([*REPL, "main.rules"], stdin=stdin, stdout=full, cwd=FIXTURES,
                              env=_env(), stderr=subprocess.PIPE, timeout=60)
    assert done.returncode == 1
    assert done.stderr == b"dynproxy repl: cannot go on: No space left on device\n"
    with open(queries, "rb") as stdin:  # a reader that goes away: no message at all
        proc = subprocess.Popen([*REPL, "main.rules"], stdin=stdin, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd=FIXTURES, env=_env())
        assert proc.stdout.readline() == b"decision: forward(legacy)\n"
        proc.stdout.close()
        assert proc.wait(timeout=60) == 1
        assert proc.stderr.read() == b""


# --- listings ----------------------------------------------------------------------------


def test_rules_pools_and_backends():
    rules, pools, backends = answers(":rules\n:pools\n:backends\n")
    assert rules.splitlines() == [
        '#1 main.rules:15: rule api: sni exact "api.example.com" and dport 443 -> forward(legacy)',
        '#2 main.rules:16: alpn ["h2", "http/1.1"] and sni suffix ".secure.example.com" -> '
        "terminate tls then forward(web)",
        '#3 main.rules:17: sni suffix ".apps.example.com" -> plugin(redis_sni)',
        '#4 main.rules:18: sni suffix ".example.com" -> lb(a:3, b:1)',
        '#5 main.rules:19: sni suffix ".example.org" and not src [10.0.0.0/8, 2001:db8::/32] -> '
        "lb(web, algo=hash(src))",
        '#6 main.rules:20: sni glob "*.internal.*" or (proto udp and dport [53, 5000..5010]) -> '
        "reject",
        "#7 main.rules:21: proto udp and dport 5353 -> forward(b)",
        '#8 rules.d/shop.rules:2: sni glob "*.shop.test" -> forward(b)',
    ]
    assert pools.splitlines() == [
        "pool web: balance least_conn; health tcp every 2s timeout 1s rise 2 fall 3",
        "  member a 127.0.0.1:9001 weight 3",
        "  member b 127.0.0.1:9002 weight 1",
        "  member [2001:db8::10]:8443 weight 1",
        '  members from redis "web-*"',
    ]
    assert backends.splitlines() == [
        "backend a 127.0.0.1:9001 weight 1",
        "backend b 127.0.0.1:9002 weight 1",
        "backend legacy 10.0.0.7:8443 weight 1 send-proxy v2",
    ]


def test_help_lists_every_command():
    [text] = answers(":help\n")
    for command in (":rules", ":pools", ":backends", ":add [N] RULE", ":drop N", ":reload",
                    ":lint", ":help", ":quit"):
        assert command in text


# --- session edits -----------------------------------------------------------------------


def test_add_and_drop_rules_in_the_session():
    blocks = answers(
        ':add sni exact "foo.net" -> forward(a)\n'
        "sni=foo.net\n"
        ':add 2 sni suffix ".net" -> forward(b)\n'
        "sni=foo.net\n"
        ":drop 1\n"
        ":rules\n"
    )
    assert blocks[0] == 'added #9 <session>:1: sni exact "foo.net" -> forward(a)'
    assert blocks[1].splitlines()[:2] == [
        "decision: forward(a)", 'rule: #9 <session>:1: sni exact "foo.net" -> forward(a)']
    assert blocks[2] == 'added #2 <session>:2: sni suffix ".net" -> forward(b)'
    assert blocks[3].splitlines() == [
        "decision: forward(b)",
        'rule: #2 <session>:2: sni suffix ".net" -> forward(b)',
        'skipped: #1 main.rules:15: sni exact "api.example.com": the SNI is \'foo.net\'',
    ]
    assert blocks[4] == ('dropped #1 main.rules:15: rule api: sni exact "api.example.com" and '
                         "dport 443 -> forward(legacy)")
    listed = blocks[5].splitlines()
    assert listed[0] == '#1 <session>:2: sni suffix ".net" -> forward(b)'
    assert listed[-1] == '#9 <session>:1: sni exact "foo.net" -> forward(a)'
    assert len(listed) == 9


@pytest.mark.parametrize(("rule", "expected"), [
    ('sni exact "foo.net" -> forward(nope)', ["<session>:1:32: error[", "'nope'"]),
    ('sni exact ( -> reject', ["<session>:1:11: error[E100]"]),
    ('sni suffix "example.com" -> reject', ["<session>:1:", "error[", "evilexample.com"]),
    ("backend x 127.0.0.1:1", ["error: `:add` takes exactly one rule, got a declaration"]),
])
def test_a_bad_added_rule_prints_diagnostics_and_changes_nothing(rule, expected):
    added, rules, then = answers(f":add {rule}\n:rules\n:add sni exact \"ok.test\" -> reject\n",
                                 failed=(1,))
    for part in expected:
        assert part in added
    if "error:" not in expected[0]:
        assert added.endswith("\nnothing changed")
    assert len(rules.splitlines()) == 8
    assert then == 'added #9 <session>:1: sni exact "ok.test" -> reject'


def test_reload_keeps_session_edits_and_a_broken_file_keeps_the_old_rules(tmp_path):
    shutil.copytree(FIXTURES, tmp_path, dirs_exist_ok=True)
    proc = subprocess.Popen([*REPL, "main.rules"], cwd=tmp_path, env=_env(),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        added = _exchange(proc, ':add 1 sni exact "foo.net" -> forward(a)\n')
        assert added == ['added #1 <session>:1: sni exact "foo.net" -> forward(a)']
        main = tmp_path / "main.rules"
        main.write_text(main.read_text().replace('".example.org"', '".example.net"'))
        reloaded, query = _exchange(proc, ":reload\nsni=a.example.net src=8.8.8.8\n")
        assert reloaded.endswith("reloaded main.rules: 9 rules")
        assert query.splitlines()[:2] == [
            "decision: lb(web:1, algo=hash(src))",
            'rule: #6 main.rules:19: sni suffix ".example.net" and not src [10.0.0.0/8, '
            '2001:db8::/32] -> lb(web, algo=hash(src))',
        ]
        (tmp_path / "rules.d" / "shop.rules").write_text('sni glob "*.shop.test" -> forward(nowhere)\n')
        failed, query = _exchange(proc, ":reload\nsni=foo.net\n")
        proc.stdin.close()
        assert proc.wait(timeout=30) == 1  # the failed :reload (input line 6) fails the script
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.stderr.read() == b"dynproxy repl: 1 line failed (input line 6)\n"
    assert "rules.d/shop.rules:1:" in failed and "'nowhere'" in failed
    assert failed.endswith("reload failed: keeping the previous rules (9 rules)")
    assert query.splitlines()[:2] == [
        "decision: forward(a)", 'rule: #1 <session>:1: sni exact "foo.net" -> forward(a)']


SENTINEL = "backend legacy 10.0.0.7:8443 weight 1 send-proxy v2"


def _exchange(proc, lines: str) -> list[str]:
    """Send `lines` to a running REPL and return their answer blocks: `:backends` follows
    them, and its known last line marks where their answers end."""
    proc.stdin.write(f"{lines}:backends\n".encode())
    proc.stdin.flush()
    out = []
    while (line := proc.stdout.readline().decode()) != SENTINEL + "\n":
        assert line, "the REPL ended early"
        out.append(line)
    blocks = "".join(out).strip("\n").split("\n\n")
    assert blocks[-1].startswith("backend a ")
    return blocks[:-1]


SHADOWED = """\
<session>:1:1: warning[W300]: this rule is unreachable: every connection it matches is taken by an earlier rule
  |
1 | sni exact "x.example.com" -> reject
  | ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
  = note: shadowed by main.rules:18:1: sni suffix ".example.com" -> lb(a:3, b:1)"""


def test_lint_shows_the_linters_warnings_for_the_current_rules():
    clean, added, linted, refused = answers(
        ':lint\n:add sni exact "x.example.com" -> reject\n:lint\n:add sni exact "y.test" -> '
        "forward(nope)\n", failed=(4,))  # warnings are no failure, a refused rule is
    assert clean == "the rules lint clean (8 rules)"
    assert added == 'added #9 <session>:1: sni exact "x.example.com" -> reject\n' + SHADOWED
    assert linted == SHADOWED
    assert refused.startswith("<session>:2:31: error[E200]: unknown backend or pool 'nope'\n")
    assert "W300" not in refused and refused.endswith("\nnothing changed")


# --- rule files that do not load ------------------------------------------------------------


@pytest.mark.parametrize(("content", "expected"), [
    (b"backend a 127.0.0.1:1\nsni exact \"a.test\" -> forward(b)\n", "bad.rules:2:"),
    (b"sni exact \"a.test\" -> \n", "bad.rules:1:"),
    (b"\xff\xfe\x00\x01" * 100, "is not UTF-8 text"),
    (b"((((" * 10_000, "bad.rules:1:"),
    (None, "cannot read rule file 'bad.rules'"),
])
def test_a_rule_file_with_errors_exits_2_with_diagnostics_on_stderr(tmp_path, content, expected):
    if content is not None:
        (tmp_path / "bad.rules").write_bytes(content)
    done = repl("sni=a.test\n", rules="bad.rules", cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == b""
    err = done.stderr.decode()
    assert expected in err and "error[" in err
    assert err.rstrip().endswith("dynproxy repl: 'bad.rules' has errors; fix them and start again")
    assert "Traceback" not in err


# --- in-process: completion, reload anchoring, internal errors ---------------------------------


@pytest.fixture
def console():
    cwd = os.getcwd()
    os.chdir(FIXTURES)
    try:
        yield Console(Session("main.rules"))
    finally:
        os.chdir(cwd)


def test_completion_candidates(console):
    assert candidates(console, "", ":r") == [":reload ", ":rules "]
    assert candidates(console, "", "d") == ["dport="]
    assert candidates(console, "sni=a.test ", "") == ["alpn=", "dport=", "proto=", "src="]
    assert candidates(console, "", "proto=") == ["proto=tcp ", "proto=udp "]
    assert candidates(console, "", "sni=ap") == ["sni=api.example.com "]
    assert candidates(console, ":drop ", "") == [f"{i} " for i in range(1, 9)]
    assert candidates(console, ":add sni exact \"x\" -> forward(", "le") == ["legacy"]
    assert candidates(console, ":add sni exact \"x\" -> lb(a:1, ", "w") == ["web"]
    assert candidates(console, ":rules ", "") == []


def test_an_added_rule_stays_before_its_rule_when_the_file_changes(tmp_path):
    (tmp_path / "r.rules").write_text('backend a 127.0.0.1:1\nsni exact "one.test" -> reject\n'
                                      'sni exact "two.test" -> reject\n')
    session = Session(str(tmp_path / "r.rules"))
    session.add('sni exact "new.test" -> forward(a)', before=2)
    session.drop(1)
    (tmp_path / "r.rules").write_text('backend a 127.0.0.1:1\nsni exact "zero.test" -> reject\n'
                                      'sni exact "one.test" -> reject\n'
                                      'sni exact "two.test" -> reject\n')
    assert session.reload() == []
    assert [r.text for r in session.rules] == ['sni exact "zero.test" -> reject',
                                               'sni exact "new.test" -> forward(a)',
                                               'sni exact "two.test" -> reject']
    (tmp_path / "r.rules").write_text('backend a 127.0.0.1:1\nsni exact "three.test" -> reject\n')
    notes = session.reload()
    assert notes == [
        "<session>:1: the rule it was added before is gone from the file; it now stands at the end",
        f'#1 {tmp_path / "r.rules"}:2: sni exact "one.test" -> reject (dropped in this session) is '
        "no longer in the file",
    ]
    assert [r.text for r in session.rules] == ['sni exact "three.test" -> reject',
                                               'sni exact "new.test" -> forward(a)']


def test_an_unexpected_failure_is_an_internal_error_and_the_session_goes_on(console, monkeypatch):
    def broken(*_a, **_kw):
        raise KeyError("boom")

    monkeypatch.setattr("dynproxy.cli.repl_console.explain", broken)
    assert console.handle("sni=a.test").text == "internal error: KeyError: 'boom'"
    assert console.handle(":rules").text.startswith("#1 main.rules:15:")


# --- a terminal ---------------------------------------------------------------------------------


def test_on_a_terminal_a_prompt_history_and_tab_completion(tmp_path):
    pid, fd = pty.fork()
    if pid == 0:  # the child: become the REPL on the pseudo-terminal
        env = {**_env(home=tmp_path), "TERM": "xterm"}
        os.chdir(FIXTURES)
        os.execve(sys.executable, [*REPL, "main.rules"], env)
    try:
        banner = _read_until(fd, b"dynproxy> ")
        assert b"dynproxy repl: 8 rules from main.rules; :help for commands" in banner
        os.write(fd, b"sni=api.example.com dport=443\r")
        assert b"decision: forward(legacy)" in _read_until(fd, b"dynproxy> ")
        os.write(fd, b":rul\t\r")  # tab completes the command
        assert b"#8 rules.d/shop.rules:2:" in _read_until(fd, b"dynproxy> ")
        os.write(fd, b"sn\tapi\tdp\t443\r")  # keys and an exact SNI complete too
        assert b"decision: forward(legacy)" in _read_until(fd, b"dynproxy> ")
        os.write(fd, b"snii=a.test\r")  # a mistake at the prompt does not change the exit status
        assert b"error: unknown key 'snii'" in _read_until(fd, b"dynproxy> ")
        os.write(fd, b"\x04")  # end of input: leave
        _read_until(fd, b"")
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0
    history = (tmp_path / ".dynproxy_history").read_text().splitlines()
    assert history[-4:] == ["sni=api.example.com dport=443", ":rules ",
                            "sni=api.example.com dport=443", "snii=a.test"]


def _read_until(fd: int, token: bytes) -> bytes:
    """Read the terminal until `token` shows up (b"": until it closes)."""
    got = b""
    while not token or token not in got:
        ready, _, _ = select.select([fd], [], [], 30)
        assert ready, f"no {token!r} from the REPL; got {got!r}"
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            chunk = b""
        if not chunk:
            assert not token, f"the REPL ended before {token!r}; got {got!r}"
            return got
        got += chunk
    return got
