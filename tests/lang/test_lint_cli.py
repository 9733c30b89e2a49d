"""`dynproxy lint` as an operator runs it: real subprocesses, exit codes, formats, and
hostile input that must end in a diagnostic and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from dynproxy.cli import lint as cli_lint

REPO = Path(__file__).resolve().parents[2]
CLEAN = "backend a 127.0.0.1:9001\ndport 80 -> forward(a)\n"
WARNS = "backend a 127.0.0.1:9001\nbackend spare 127.0.0.1:9002\ndport 80 -> forward(a)\n"
BROKEN = "backend a 127.0.0.1:9001\ndport 80 -> forward(a)\ndport 81 -> forward(b)\n"


def dynproxy_lint(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(
        [sys.executable, "-m", "dynproxy", "lint", *args],
        cwd=cwd, env=env, capture_output=True, text=True, errors="replace", timeout=120,
    )


def write(tmp_path: Path, name: str, text: str) -> str:
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_text(text, encoding="utf-8")
    return name


def assert_no_traceback(proc: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_exit_codes_and_summaries(tmp_path):
    for name, text in (("clean.rules", CLEAN), ("warns.rules", WARNS), ("broken.rules", BROKEN)):
        write(tmp_path, name, text)
    ok = dynproxy_lint("clean.rules", cwd=tmp_path)
    assert (ok.returncode, ok.stdout) == (0, "clean.rules: ok\n")
    warned = dynproxy_lint("warns.rules", cwd=tmp_path)
    assert warned.returncode == 0
    assert warned.stdout.startswith("warns.rules:2:9: warning[W310]: backend 'spare' is declared")
    assert warned.stdout.endswith("\nwarns.rules: 1 warning\n")
    assert dynproxy_lint("--strict", "warns.rules", cwd=tmp_path).returncode == 1
    broken = dynproxy_lint("--strict", "clean.rules", "broken.rules", cwd=tmp_path)
    assert broken.returncode == 2
    assert "broken.rules:3:21: error[E200]: unknown backend or pool 'b'" in broken.stdout
    assert broken.stdout.startswith("clean.rules: ok\n")
    assert broken.stdout.endswith("broken.rules: 1 error\n")
    assert_no_traceback(broken)


def test_json_format_carries_the_same_diagnostics(tmp_path):
    write(tmp_path, "warns.rules", WARNS)
    write(tmp_path, "broken.rules", BROKEN)
    proc = dynproxy_lint("--format", "json", "warns.rules", "broken.rules", cwd=tmp_path)
    assert proc.returncode == 2
    doc = json.loads(proc.stdout)
    assert (doc["errors"], doc["warnings"]) == (1, 1)
    found = [(d["code"], d["file"], d["line"], d["column"]) for d in doc["diagnostics"]]
    assert found == [("W310", "warns.rules", 2, 9), ("E200", "broken.rules", 3, 21)]
    assert doc["diagnostics"][1]["notes"][0]["kind"] == "help"


def test_paths_are_shown_as_given_from_another_directory(tmp_path):
    write(tmp_path, "rules/main.rules", 'include "d/*.rules"\n' + BROKEN)
    write(tmp_path, "rules/d/extra.rules", "backend spare 127.0.0.1:1\n")
    proc = dynproxy_lint("rules/main.rules", cwd=tmp_path)
    assert proc.returncode == 2
    assert "rules/main.rules:4:21: error[E200]" in proc.stdout
    assert "rules/d/extra.rules:1:9: warning[W310]" in proc.stdout
    assert proc.stdout.endswith("rules/main.rules: 1 error, 1 warning\n")


def test_config_names_plugins_and_certificates(tmp_path):
    write(tmp_path, "main.rules", "backend a 127.0.0.1:1\n"
          'sni suffix ".t.example.com" -> plugin(tenant_router)\n'
          'sni suffix ".example.com" -> terminate tls cert wild then forward(a)\n')
    write(tmp_path, "dynproxy.yaml", "plugins:\n  - {name: tenant_router, module: x.y}\n"
          "tls:\n  certificates:\n    - {name: wild, cert_path: a.crt, key_path: a.key}\n")
    write(tmp_path, "other.yaml", "tls:\n  certificates:\n    - {name: wildcard}\n")
    bare = dynproxy_lint("main.rules", cwd=tmp_path)
    assert bare.returncode == 2 and "[E203]" in bare.stdout and "[E204]" not in bare.stdout
    assert dynproxy_lint("--config", "dynproxy.yaml", "main.rules", cwd=tmp_path).returncode == 0
    other = dynproxy_lint("--config", "other.yaml", "main.rules", cwd=tmp_path)
    assert "error[E204]: unknown certificate 'wild'" in other.stdout
    assert "help: did you mean 'wildcard'?" in other.stdout


@pytest.mark.parametrize("config, expected", [
    ("plugins: [unclosed\n", "dynproxy.yaml:2:1: error[E001]: config 'dynproxy.yaml' is not valid YAML"),
    ("plugins: tenant_router\n", "`plugins` must be a list of mappings with a `name`"),
    (None, "error[E001]: cannot read config 'dynproxy.yaml'"),
])
def test_a_bad_config_is_a_diagnostic(tmp_path, config, expected):
    write(tmp_path, "main.rules", CLEAN)
    if config is not None:
        write(tmp_path, "dynproxy.yaml", config)
    proc = dynproxy_lint("--config", "dynproxy.yaml", "main.rules", cwd=tmp_path)
    assert proc.returncode == 2
    assert expected in proc.stdout
    assert_no_traceback(proc)


# --- hostile input ----------------------------------------------------------------------


def _garbage(path: Path) -> None:
    path.write_bytes(bytes(range(256)) * 64)


def _latin1(path: Path) -> None:
    path.write_bytes(b"backend a 127.0.0.1:1\nsni exact \"caf\xe9.example\" -> forward(a)\n")


def _utf8_garbage(path: Path) -> None:
    path.write_text("\u00ff\u4e2d\u0001\u001b[31m -> ))) \x00 \"\n" * 200, encoding="utf-8")


def _fifty_megabytes(path: Path) -> None:
    with path.open("wb") as f:
        line = b"# " + b"x" * 1021 + b"\n"
        for _ in range(50 * 1024):
            f.write(line)


def _nested_parens(path: Path) -> None:
    path.write_text("backend a 127.0.0.1:1\n" + "(" * 100_000 + "proto tcp" + ")" * 100_000
                    + " -> forward(a)\n")


def _not_chain(path: Path) -> None:
    path.write_text("backend a 127.0.0.1:1\n" + "not " * 100_000 + "proto tcp -> forward(a)\n")


def _million_rules(path: Path) -> None:
    with path.open("w") as f:
        f.write("backend a 127.0.0.1:1\n")
        for start in range(0, 1_000_000, 10_000):
            f.write("".join(f'sni exact "host{i}.example.com" -> forward(a)\n'
                            for i in range(start, start + 10_000)))


def _one_long_line(path: Path) -> None:
    path.write_text("backend a 127.0.0.1:1\n" + "dport 80 and " * 20_000 + "-> forward(a)\n")


@pytest.mark.parametrize("make, code", [
    (_garbage, "E001"),
    (_latin1, "E001"),
    (_utf8_garbage, "E100"),
    (_fifty_megabytes, "E001"),
    (_nested_parens, "E101"),
    (_not_chain, "E101"),
    (_million_rules, "E001"),
    (_one_long_line, "E100"),
], ids=lambda x: getattr(x, "__name__", x))
def test_hostile_input_ends_in_a_diagnostic(tmp_path, make, code):
    make(tmp_path / "bad.rules")
    proc = dynproxy_lint("bad.rules", cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert f"error[{code}]" in proc.stdout
    assert proc.stdout.endswith("bad.rules: 1 error\n")
    assert "\x1b" not in proc.stdout  # no terminal escapes echoed back from the file
    assert_no_traceback(proc)


def test_long_conditions_are_fine(tmp_path):
    write(tmp_path, "long.rules", "backend a 127.0.0.1:1\n"
          + "dport 80 and " * 20_000 + "proto tcp -> forward(a)\n"
          + 'sni exact "a.com" or ' * 20_000 + "proto udp -> forward(a)\n")
    proc = dynproxy_lint("long.rules", cwd=tmp_path)
    assert (proc.returncode, proc.stdout) == (0, "long.rules: ok\n")


def test_paths_that_are_not_rule_files(tmp_path):
    (tmp_path / "a_dir").mkdir()
    write(tmp_path, "empty.rules", "")
    proc = dynproxy_lint("missing.rules", "a_dir", "empty.rules", cwd=tmp_path)
    assert proc.returncode == 2
    assert "missing.rules:1:1: error[E001]: cannot read rule file 'missing.rules'" in proc.stdout
    assert "a_dir:1:1: error[E001]: cannot read rule file 'a_dir'" in proc.stdout
    # an empty file would reject everything: said as an error (a truncated file, mostly)
    assert "empty.rules:1:1: error[E219]: there are no rules" in proc.stdout
    assert proc.stdout.endswith("empty.rules: 1 error\n")
    assert_no_traceback(proc)


def test_an_internal_error_is_reported_not_raised(tmp_path, monkeypatch):
    def explode(*a, **kw):
        raise RuntimeError("the analysis fell over")

    monkeypatch.setattr(cli_lint, "lint_path", explode)
    monkeypatch.chdir(tmp_path)
    write(tmp_path, "main.rules", CLEAN)
    result = CliRunner().invoke(cli_lint.lint, ["main.rules"])
    assert result.exit_code == 2
    assert "main.rules:1:1: error[E999]: internal error while linting: RuntimeError: the " \
        "analysis fell over" in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_many_identical_warnings_are_summarised(tmp_path):
    rules = "".join(f"backend b{i} 127.0.0.1:{1000 + i}\n" for i in range(150))
    write(tmp_path, "many.rules", rules + "default -> reject\n")
    proc = dynproxy_lint("many.rules", cwd=tmp_path)
    assert proc.returncode == 0
    assert proc.stdout.count("warning[W310]") == 100
    assert "... and 50 more [W310] diagnostics not shown\nmany.rules: 150 warnings\n" in proc.stdout
