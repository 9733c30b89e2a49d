"""`pip install .` (not editable) gives a working `dynproxy lint` anywhere: the grammar
ships inside the wheel."""

import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None):
    return subprocess.run([str(a) for a in args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_wheel_install_lints_from_another_directory(tmp_path):
    env_dir = tmp_path / "venv"
    # Dependencies come from the running interpreter's site-packages; dynproxy itself
    # is built into a wheel and installed into the venv, which shadows any checkout.
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                "-w", tmp_path / "dist", ROOT)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "dist").glob("dynproxy-*.whl"))
    # The venv's python runs pip (seen through the system site-packages), so the
    # console script gets the venv's interpreter.
    installed = run(py, "-m", "pip", "install", "--no-deps", "--no-index", wheel)
    assert installed.returncode == 0, installed.stderr
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.rules").write_text('backend a 127.0.0.1:1\nsni suffix ".a.test" -> forward(a)\n'
                                       "default -> reject\n")
    where = run(py, "-c", "import dynproxy; print(dynproxy.__file__)", cwd=elsewhere)
    assert str(env_dir) in where.stdout, where.stdout + where.stderr
    lint = run(env_dir / "bin" / "dynproxy", "lint", "x.rules", cwd=elsewhere)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    assert "x.rules: ok" in lint.stdout
    bad = run(py, "-m", "dynproxy", "lint", "missing.rules", cwd=elsewhere)
    assert bad.returncode == 2 and "cannot read rule file" in bad.stdout + bad.stderr


def test_every_subpackage_is_listed_in_pyproject():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts)
             for p in (ROOT / "dynproxy").rglob("__init__.py")}
    assert found | {"dynproxy.grammar"} == listed
