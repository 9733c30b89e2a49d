"""How a setting is declared once, and what is derived from that declaration.

`setting(default, kind, help)` declares one field of a frozen config dataclass: the
key is the field name, the dotted name follows from where the dataclass sits in the
tree, the default is written in YAML form (the documented example shows it as such)
and checked by the kind at import, so a wrong default cannot ship. From those
declarations `build` reads a YAML mapping into a dataclass, `to_plain` turns one back
into plain data, and `declared_fields` lets the example and the CLI walk them.

Must never do I/O nor import gevent, socket, ssl or redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import Field, dataclass, field, fields
from typing import Any

from dynproxy.core.config_problems import Path, ProblemCollector, short_repr
from dynproxy.core.config_values import INVALID, Kind

__all__ = [
    "REQUIRED", "Record", "Section", "Setting", "build", "declared_fields", "section",
    "setting", "to_plain",
]

REQUIRED: Any = type("Required", (), {"__repr__": lambda self: "REQUIRED"})()
_DECLARATION = "dynproxy.config.setting"


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting as declared: how it is checked, what it means, its default."""

    kind: Kind
    help: str
    default: object  # as written in YAML; REQUIRED when the key must be given
    example: object = None  # a further value shown, commented out, in the example file

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


def setting(default: object, kind: Kind, help: str, *, example: object = None) -> Any:
    """Declare a config field; the default is given as YAML would write it."""
    declared = Setting(kind, help, default, example)
    metadata = {_DECLARATION: declared}
    if declared.required:
        return field(metadata=metadata)
    return field(default=_checked(declared), metadata=metadata)


def section(cls: type, help: str) -> Any:
    """Declare a nested section (a mapping of further settings)."""
    return field(default_factory=cls, metadata={_DECLARATION: Setting(Section(cls), help, {})})


def declared_fields(cls: type) -> Iterator[tuple[str, Setting]]:
    for each in fields(cls):
        declared = _declaration(each)
        if declared is not None:
            yield each.name, declared


def _declaration(each: Field) -> Setting | None:
    return each.metadata.get(_DECLARATION)


def _checked(declared: Setting) -> object:
    report = ProblemCollector("<declaration>")
    value = declared.kind.check(declared.default, ("default",), report)
    if declared.example is not None:
        declared.kind.check(declared.example, ("example",), report)
    if report.problems:
        raise TypeError(f"config declaration is wrong: {report.problems[0]}")
    return value


class Section(Kind):
    """A mapping of settings; a bad key falls back to its default (after reporting)."""

    def __init__(self, cls: type) -> None:
        self.cls = cls
        self.expected = "a mapping with keys " + ", ".join(n for n, _ in declared_fields(cls))

    def check(self, value: object, at: Path, report: ProblemCollector,
              expected: str | None = None) -> object:
        instance, _ = build(self.cls, {} if value is None else value, at, report,
                            expected or self.expected)
        return self.cls() if instance is INVALID else instance

    def to_plain(self, parsed: object, *, redact: bool = False) -> object:
        return to_plain(parsed, redact=redact)


class Record(Section):
    """A mapping that is one item of a list: any problem invalidates the whole item."""

    def check(self, value: object, at: Path, report: ProblemCollector,
              expected: str | None = None) -> object:
        instance, complete = build(self.cls, value, at, report, expected or self.expected)
        return instance if complete else INVALID


def build(cls: type, raw: object, at: Path, report: ProblemCollector,
          expected: str) -> tuple[object, bool]:
    """Read a mapping into `cls`; returns (instance or INVALID, whether all was well)."""
    if not isinstance(raw, dict):
        report.invalid(at, short_repr(raw), expected)
        return INVALID, False
    values: dict[str, object] = {}
    complete = _check_fields(cls, raw, at, report, values)
    known = [name for name, _ in declared_fields(cls)]
    for key in raw:
        if key not in known:
            report.unknown_key((*at, key), known)
            complete = False
    missing = any(declared.required and name not in values
                  for name, declared in declared_fields(cls))
    return (INVALID if missing else cls(**values)), complete


def _check_fields(cls: type, raw: dict, at: Path, report: ProblemCollector,
                  values: dict[str, object]) -> bool:
    complete = True
    for name, declared in declared_fields(cls):
        if name not in raw:
            if declared.required:
                report.missing((*at, name), declared.kind.expected)
                complete = False
            continue
        value = declared.kind.check(raw[name], (*at, name), report)
        if value is INVALID:
            complete = False
        else:
            values[name] = value
    return complete


def to_plain(instance: object, *, redact: bool = False) -> dict[str, object]:
    """A config dataclass as plain data (dicts, lists, str, numbers) that loads back."""
    return {name: declared.kind.to_plain(getattr(instance, name), redact=redact)
            for name, declared in declared_fields(type(instance))}
