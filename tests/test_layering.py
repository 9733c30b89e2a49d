"""The folder tree is the architecture: pure packages import no I/O modules.

Each pure module is imported in a fresh interpreter, and the test fails if gevent,
socket, ssl, select or redis got imported along the way."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PURE = sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts)
    for pkg in ("dynproxy/core", "dynproxy/lang")
    for p in (ROOT / pkg).glob("*.py")
    if p.name != "__init__.py"
)
FORBIDDEN = ("gevent", "socket", "ssl", "redis", "select", "selectors")


@pytest.mark.parametrize("module", PURE)
def test_pure_module_imports_no_io(module):
    code = (
        f"import sys; import {module}; "
        f"bad = [m for m in {FORBIDDEN!r} if m in sys.modules]; "
        "print(','.join(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    assert out == "", f"{module} pulls in {out}"
