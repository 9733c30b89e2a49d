"""dynproxy's configuration: load it from YAML, override it from flags, document it.

    cfg = load_config_file("config/dynproxy.yaml")         # or load_config(text)
    cfg = apply_overrides(cfg, {"server.tcp_bind": ["[::1]:8443"], "server.workers": "2"})
    cfg.server.timeouts.connect   # 5.0 (float seconds)
    cfg.server.tcp_bind           # (Bind(host='::1', port=8443),)

Every setting is declared once in config_schema; loading, overrides, the example file
(render_example) and `Config.to_dict()` derive from there. Anything wrong raises one
ConfigError listing every problem with its key, value, expected form, file and line.

Must never do I/O beyond reading the file named to load_config_file, nor import
gevent, socket, ssl or redis.
"""

from __future__ import annotations

import copy
import difflib
import os
from collections.abc import Iterator, Mapping
from dataclasses import replace

from dynproxy.core.config_checks import BUILTIN_PLUGINS, check_config
from dynproxy.core.config_example import render_example
from dynproxy.core.config_fields import Section, Setting, declared_fields
from dynproxy.core.config_problems import (
    ConfigError,
    ConfigProblem,
    MarkTable,
    Path,
    ProblemCollector,
    short_repr,
)
from dynproxy.core.config_schema import (
    Bind,
    CertificateEntry,
    Config,
    ConfigOrigin,
    Health,
    Monitoring,
    PluginSpec,
    Redis,
    Server,
    Shutdown,
    Timeouts,
    Tls,
    UdpListener,
)
from dynproxy.core.config_values import parse_bind, parse_duration
from dynproxy.core.config_yaml import decode_utf8, read_yaml

__all__ = [
    "BUILTIN_PLUGINS", "Bind", "CertificateEntry", "Config", "ConfigError", "ConfigProblem",
    "Health", "MAX_FILE_BYTES", "Monitoring", "PluginSpec", "Redis", "SETTINGS", "Server",
    "Setting", "Shutdown", "Timeouts", "Tls", "UdpListener", "apply_overrides",
    "load_config", "load_config_bytes", "load_config_file", "parse_bind", "parse_duration", "render_example",
]

MAX_FILE_BYTES = 4 * 1024 * 1024  # far beyond any real config; stops a wrong file early


def _leaf_settings(cls: type, prefix: Path) -> Iterator[tuple[str, Setting]]:
    for name, declared in declared_fields(cls):
        if type(declared.kind) is Section:
            yield from _leaf_settings(declared.kind.cls, (*prefix, name))  # type: ignore[attr-defined]
        else:
            yield ".".join((*prefix, name)), declared  # type: ignore[arg-type]


# Every setting by dotted name ("server.timeouts.connect"), for CLI flags and help.
SETTINGS: Mapping[str, Setting] = dict(_leaf_settings(Config, ()))
_SECTIONS = frozenset(".".join(key.split(".")[:depth])
                      for key in SETTINGS for depth in range(1, key.count(".") + 1))


def load_config(text: str | bytes | None, source: str = "<config>") -> Config:
    """Config from YAML text; None, empty or comments only give the defaults."""
    if text is None:
        return Config(origin=ConfigOrigin(source, {}, MarkTable()))
    if isinstance(text, bytes):
        text = decode_utf8(text, source)
    raw, marks = read_yaml(text, source)
    if raw is None:
        return Config(origin=ConfigOrigin(source, {}, marks))
    if not isinstance(raw, dict):
        raise ConfigError([_not_a_mapping(raw, marks, source)])
    return _build(raw, ConfigOrigin(source, raw, marks), _collector(source, marks))


def _not_a_mapping(raw: object, marks: MarkTable, source: str) -> ConfigProblem:
    mark = marks.find(())
    sections = ", ".join(name for name, _ in declared_fields(Config))
    return ConfigProblem(source, mark.line if mark else None, mark.column if mark else None,
                         "", "the config is not a mapping:", short_repr(raw),
                         f"a mapping of sections: {sections}",
                         "start from config/dynproxy.yaml or `dynproxy init`")


def load_config_file(path: str | os.PathLike[str]) -> Config:
    """Config from a YAML file; an unreadable or non-UTF-8 file is a ConfigError too."""
    source = os.fspath(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except OSError as problem:
        raise ConfigError([ConfigProblem(
            source, None, None, "", f"cannot read the file ({problem.strerror})", None,
            "a readable YAML file", "check the path given with --config")]) from None
    if len(data) > MAX_FILE_BYTES:
        raise ConfigError([ConfigProblem(
            source, None, None, "", "file too large", f"{len(data):,}+ bytes",
            f"at most {MAX_FILE_BYTES:,} bytes", "is this the config file?")])
    return load_config_bytes(data, source)


def load_config_bytes(data: bytes, source: str) -> Config:
    """Config from a named file's bytes: unlike load_config(None), an empty file is an
    error (named on purpose and empty means truncated, mostly)."""
    if not data.strip():
        raise ConfigError([ConfigProblem(
            source, None, None, "", "the file is empty", None, "a YAML mapping of settings",
            "leave out --config to run on the built-in defaults")])
    return load_config(data, source)


def apply_overrides(config: Config, overrides: Mapping[str, object],
                    source: str = "command line") -> Config:
    """A new Config with dotted keys set, each value validated exactly as in YAML.

    A str value is read as a command-line flag would give it ("2" for an integer,
    "false" for a boolean, one address for a list of addresses); other values are
    taken as YAML would give them. Problems name `source` instead of a file line.
    """
    paths, problems = _override_paths(overrides, source)
    if problems:
        raise ConfigError(problems)
    origin = _origin_of(config)
    raw = copy.deepcopy(origin.raw)
    for value, path in zip(overrides.values(), paths, strict=True):
        kind = SETTINGS[".".join(path)].kind  # type: ignore[arg-type]
        _assign(raw, path, kind.from_text(value) if isinstance(value, str) else value)
    report = _collector(origin.source, origin.marks, override_paths=paths,
                        override_source=source)
    return _build(raw, replace(origin, raw=raw), report)


def _build(raw: object, origin: ConfigOrigin, report: ProblemCollector) -> Config:
    config = Section(Config).check(raw, (), report)
    check_config(config, report)  # type: ignore[arg-type]
    if report.problems:
        raise ConfigError(report.sorted_problems())
    return replace(config, origin=origin)  # type: ignore[type-var]


def _collector(source: str, marks: MarkTable, **options: object) -> ProblemCollector:
    return ProblemCollector(source, marks, known_keys=SETTINGS, **options)  # type: ignore[arg-type]


def _override_paths(overrides: Mapping[str, object],
                    source: str) -> tuple[list[Path], list[ConfigProblem]]:
    paths: list[Path] = []
    problems = []
    for key in overrides:
        name = key.strip().replace("-", "_")
        if name not in SETTINGS:
            problems.append(_unknown_override(key, source))
        paths.append(tuple(name.split(".")))
    return paths, problems


def _unknown_override(key: str, source: str) -> ConfigProblem:
    if key in _SECTIONS:
        return ConfigProblem(source, None, None, key, "is a section, not a setting", None,
                             "a setting such as " + next(k for k in SETTINGS
                                                         if k.startswith(key + ".")))
    close = difflib.get_close_matches(key, list(SETTINGS), n=1, cutoff=0.6)
    return ConfigProblem(source, None, None, key, "unknown setting", None,
                         "a dotted setting name such as 'server.tcp_bind'",
                         f"did you mean {close[0]!r}?" if close else None)


def _origin_of(config: Config) -> ConfigOrigin:
    """What `config` was loaded from, or (if built or changed in code) its plain data."""
    origin = config.origin
    if origin is not None:
        try:
            if _build(origin.raw, origin, _collector(origin.source, origin.marks)) == config:
                return origin
        except ConfigError:
            pass  # origin no longer matches config; start from config's own values
    return ConfigOrigin("<config>", _plain_of(config), MarkTable())


def _plain_of(config: Config) -> dict:
    """config as plain data, leaving out listener settings it inherits (so they still do)."""
    plain = config.to_dict(redact=False)
    server = plain["server"]
    inherited = {"session_idle": config.server.timeouts.udp_session_idle,
                 "max_sessions": config.server.udp_max_sessions}
    for listener in server["udp_bind"]:  # type: ignore[index]
        for key, value in inherited.items():
            if listener[key] == value:
                del listener[key]
    return plain


def _assign(raw: dict, path: Path, value: object) -> None:
    node = raw
    for part in path[:-1]:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[path[-1]] = value


if __name__ == "__main__":  # python -m dynproxy.core.config > config/dynproxy.yaml
    print(render_example(), end="")
