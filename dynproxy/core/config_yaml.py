"""YAML text -> plain data plus where each key and value sits in the text.

PyYAML's node tree keeps positions that its constructed objects lose, so the text is
composed into nodes, and the nodes are turned into plain data (dict, list, scalars)
here, recording a Mark per path for error messages. Also reports what plain loading
hides: duplicate keys, non-string keys, and absurd documents (too deep, too many
nodes, as alias bombs make), each as a ConfigProblem rather than a crash.

Must never do I/O nor import gevent, socket, ssl or redis: it is given the text.
"""

from __future__ import annotations

import yaml

from dynproxy.core.config_problems import (
    ConfigError,
    ConfigProblem,
    Mark,
    MarkTable,
    Path,
    dotted,
    short_repr,
)

__all__ = ["decode_utf8", "read_yaml"]

MAX_DEPTH = 64
MAX_NODES = 200_000  # counting alias revisits, so an alias bomb stops early
_YAML_HELP = "check the indentation, and quote values that contain ': ', '[', '{' or '#'"


def decode_utf8(data: bytes, source: str) -> str:
    """Bytes -> text, or a ConfigError pointing at the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as problem:
        line_start = data.rfind(b"\n", 0, problem.start) + 1
        raise ConfigError([ConfigProblem(
            source, data.count(b"\n", 0, problem.start) + 1, problem.start - line_start + 1,
            "", "not UTF-8 text:", f"byte 0x{data[problem.start]:02x}", "a UTF-8 text file",
            "save the file as UTF-8")]) from None


def read_yaml(text: str, source: str) -> tuple[object, MarkTable]:
    """Plain data of the single YAML document in `text`, and its marks."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)  # checks the characters already
        node = loader.get_single_node()
        if node is None:
            return None, MarkTable()
        return _Converter(loader, source).convert(node)
    except yaml.MarkedYAMLError as problem:
        raise ConfigError([_syntax_problem(problem, source)]) from None
    except yaml.YAMLError as problem:  # the reader: characters YAML does not allow
        raise ConfigError([_reader_problem(problem, text, source)]) from None
    except RecursionError:
        raise ConfigError([_document_problem(source, "nested too deeply")]) from None
    finally:
        if loader is not None:
            loader.dispose()


def _syntax_problem(problem: yaml.MarkedYAMLError, source: str) -> ConfigProblem:
    mark = problem.problem_mark or problem.context_mark
    what = " ".join(part for part in (problem.context, problem.problem) if part)
    return ConfigProblem(source, mark.line + 1 if mark else None,
                         mark.column + 1 if mark else None, "", f"invalid YAML: {what}",
                         None, "valid YAML", _YAML_HELP)


def _reader_problem(problem: yaml.YAMLError, text: str, source: str) -> ConfigProblem:
    position = getattr(problem, "position", 0)
    line_start = text.rfind("\n", 0, position) + 1
    character = getattr(problem, "character", None)
    if isinstance(character, int):  # PyYAML gives the code point
        character = chr(character)
    return ConfigProblem(source, text.count("\n", 0, position) + 1, position - line_start + 1,
                         "", "invalid YAML: character not allowed:", short_repr(character),
                         "printable text", "remove control characters from the file")


def _document_problem(source: str, what: str) -> ConfigProblem:
    return ConfigProblem(source, None, None, "", f"invalid YAML: {what}", None,
                         f"at most {MAX_DEPTH} levels and {MAX_NODES:,} values", None)


class _Converter:
    """Walks composed nodes into plain data, recording marks and problems."""

    def __init__(self, loader: yaml.SafeLoader, source: str) -> None:
        self.loader = loader
        self.source = source
        self.marks = MarkTable()
        self.problems: list[ConfigProblem] = []
        self.visited = 0

    def convert(self, node: yaml.Node) -> tuple[object, MarkTable]:
        data = self.value(node, ())
        if self.problems:
            raise ConfigError(self.problems)
        return data, self.marks

    def value(self, node: yaml.Node, at: Path) -> object:
        self.visited += 1
        if self.visited > MAX_NODES or len(at) > MAX_DEPTH:
            raise ConfigError([_document_problem(self.source, "too large or too deep")])
        self.marks.values[at] = _mark(node)
        if isinstance(node, yaml.MappingNode):
            return self.mapping(node, at)
        if isinstance(node, yaml.SequenceNode):
            return [self.value(item, (*at, index)) for index, item in enumerate(node.value)]
        return self.scalar(node, at)

    def scalar(self, node: yaml.Node, at: Path) -> object:
        try:
            return self.loader.construct_object(node, deep=True)
        except yaml.YAMLError:
            raise
        except Exception as problem:  # noqa: BLE001 - explicit tags (!!int abc) fail raw
            self.add(node, at, "invalid YAML: unreadable value", f"a value its tag "
                     f"{node.tag!r} allows", f"{type(problem).__name__}: {problem}")
            return None

    def mapping(self, node: yaml.MappingNode, at: Path) -> dict[str, object]:
        own = {id(key) for key, _ in node.value if key.tag != "tag:yaml.org,2002:merge"}
        self.loader.flatten_mapping(node)  # `<<:` merge keys first, as safe_load does
        result: dict[str, object] = {}
        written_here: set[str] = set()  # merged values may be replaced; own ones not
        for key_node, value_node in node.value:
            key = self.scalar(key_node, at)
            if not isinstance(key, str):
                self.add(key_node, at, f"invalid key {short_repr(key)}", "keys that are names")
                continue
            if key in written_here:
                first = self.marks.keys[(*at, key)]
                self.add(key_node, (*at, key), "duplicate key", "each key once",
                         f"first given at line {first.line}")
                continue
            if id(key_node) in own:
                written_here.add(key)
            self.marks.keys[(*at, key)] = _mark(key_node)
            result[key] = self.value(value_node, (*at, key))
        return result

    def add(self, node: yaml.Node, at: Path, what: str, expected: str,
            hint: str | None = None) -> None:
        mark = _mark(node)
        self.problems.append(ConfigProblem(self.source, mark.line, mark.column, dotted(at),
                                           what, None, expected, hint))


def _mark(node: yaml.Node) -> Mark:
    return Mark(node.start_mark.line + 1, node.start_mark.column + 1)
