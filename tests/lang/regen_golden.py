"""Rewrite tests/lang/golden/invalid/*.expected from the linter's current output.

For humans only, after checking by eye that the new output is right:

    python -m tests.lang.regen_golden          # from the repository root

The tests never call this; they compare. Each expected file is the exact text
`dynproxy lint invalid/NAME.rules` prints when run from tests/lang/golden (with
`--config invalid/NAME.config.yaml` when that file exists).
"""

from __future__ import annotations

import os
from pathlib import Path

from click.testing import CliRunner

from dynproxy.cli.lint import lint

GOLDEN = Path(__file__).resolve().parent / "golden"


def lint_args(rules: Path) -> list[str]:
    """The command-line arguments for one golden file, relative to GOLDEN."""
    args = [str(rules.relative_to(GOLDEN))]
    config = rules.with_suffix(".config.yaml")
    if config.exists():
        args = ["--config", str(config.relative_to(GOLDEN))] + args
    return args


def run_lint(args: list[str]) -> tuple[str, int]:
    """(stdout, exit code) of `dynproxy lint ARGS` run from GOLDEN."""
    cwd = os.getcwd()
    os.chdir(GOLDEN)
    try:
        result = CliRunner().invoke(lint, args, catch_exceptions=False)
    finally:
        os.chdir(cwd)
    return result.output, result.exit_code


def main() -> None:
    for rules in sorted((GOLDEN / "invalid").glob("*.rules")):
        output, _ = run_lint(lint_args(rules))
        rules.with_suffix(".expected").write_text(output, encoding="utf-8")
        print(f"wrote {rules.with_suffix('.expected').relative_to(GOLDEN)}")


if __name__ == "__main__":
    main()
