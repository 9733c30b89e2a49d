"""Numeric command-line values whose errors say what, the accepted range and an example.

click on its own answers `set-weight web-1 -3` with "No such option: -3" (a token
starting with `-` is taken for an option before any type sees it) and a bad number
with "is not in the range x>=1". `SignedArgsCommand` lets a negative number reach
its argument, and `WholeNumber` / `Seconds` explain what is accepted. No I/O.
"""

from __future__ import annotations

import math
import re

import click

NEGATIVE_NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class SignedArgsCommand(click.Command):
    """A command with numeric arguments: `-3` on its command line is the argument's
    value (refused or not by the argument's type), not an unknown option."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        try:
            return super().parse_args(ctx, list(args))
        except click.NoSuchOption as exc:
            if not any(NEGATIVE_NUMBER.fullmatch(a) and a.startswith(exc.option_name)
                       for a in _before_double_dash(args)):
                raise
        # The parser raised before any parameter was handled: parse again, letting
        # unknown `-...` tokens through as arguments so that the types judge them.
        ctx.ignore_unknown_options = True
        return super().parse_args(ctx, list(args))


def _before_double_dash(args: list[str]) -> list[str]:
    return args[: args.index("--")] if "--" in args else list(args)


class WholeNumber(click.ParamType):
    """An integer in low..high (high None: no upper bound)."""

    name = "integer"

    def __init__(self, what: str, low: int, high: int | None, example: str, note: str = ""):
        self.what, self.low, self.high = what, low, high
        self.example, self.note = example, note

    def convert(self, value, param, ctx) -> int:
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        else:
            try:
                number = int(str(value).strip(), 10)
            except ValueError:
                self.fail(self._explain(value), param, ctx)
        if number < self.low or (self.high is not None and number > self.high):
            self.fail(self._explain(value), param, ctx)
        return number

    def _explain(self, value) -> str:
        span = f"in {self.low}..{self.high}" if self.high is not None else \
            f"of at least {self.low}"
        note = f" ({self.note})" if self.note else ""
        return f"{str(value)!r} is not {self.what}: write a whole number {span}{note}, " \
            f"e.g. {self.example}"


class Seconds(click.ParamType):
    """A number of seconds above 0 (fractions allowed)."""

    name = "seconds"

    def __init__(self, example: str, note: str = ""):
        self.example, self.note = example, note

    def convert(self, value, param, ctx) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            seconds = math.nan
        if not seconds > 0:  # also refuses nan
            note = f" ({self.note})" if self.note else ""
            self.fail(f"{str(value)!r} is not a number of seconds: write a number above 0"
                      f"{note}, e.g. {self.example}", param, ctx)
        return seconds
