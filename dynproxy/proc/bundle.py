"""What the master validated, as one value a worker builds from: the config file's
bytes, every rule file's bytes, the command-line overrides and the generation.

The master loads through `RecordingFiles` (the disk, remembered); a worker loads
through `BundleFiles` (the record), so includes and globs resolve exactly as they did
in the master and a file edited in between cannot reach a worker unvalidated.
Certificates and plugin modules are still read by each worker (see docs/operations.md).
No sockets here.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path

from dynproxy.lang.loader import DiskFiles
from dynproxy.net.state import Snapshot
from dynproxy.proc.build import Sources, build_snapshot

__all__ = ["Bundle", "BundleFiles", "RecordingFiles", "build_recorded", "build_from_bundle"]


def _key(path: Path | str) -> str:
    return os.path.normpath(str(path))


class RecordingFiles(DiskFiles):
    """The disk, remembering every file read (and what it is, for cycle detection)."""

    def __init__(self) -> None:
        self.texts: dict[str, bytes] = {}
        self.identities: dict[str, str] = {}

    def read(self, path: Path, limit: int) -> bytes:
        data = super().read(path, limit)
        self.texts[_key(path)] = data
        return data

    def identity(self, path: Path) -> str:
        real = super().identity(path)
        self.identities[_key(path)] = real
        return real


class BundleFiles:
    """Answers the loader from a Bundle: only files the master read exist."""

    def __init__(self, texts: dict[str, bytes], identities: dict[str, str]) -> None:
        self.texts, self.identities = texts, identities

    def read(self, path: Path, limit: int) -> bytes:
        try:
            return self.texts[_key(path)]
        except KeyError:
            raise FileNotFoundError(2, "not in the validated bundle", str(path)) from None

    def identity(self, path: Path) -> str:
        return self.identities.get(_key(path), _key(path))

    def glob_files(self, pattern: str) -> list[str]:
        wanted = _key(pattern).split(os.sep)
        return sorted(k for k in self.texts if _glob_match(k.split(os.sep), wanted))

    def exists(self, path: str) -> bool:
        return _key(path) in self.texts


def _glob_match(parts: list[str], pattern: list[str]) -> bool:
    """glob's rules: one pattern part per path part; `*` never matches a leading dot."""
    if len(parts) != len(pattern):
        return False
    for part, pat in zip(parts, pattern, strict=True):
        if not fnmatch.fnmatchcase(part, pat):
            return False
        if part.startswith(".") and not pat.startswith("."):
            return False
    return True


@dataclass(frozen=True)
class Bundle:
    generation: int
    rules_path: str
    config_path: str | None
    overrides: dict
    texts: dict[str, bytes]
    identities: dict[str, str]

    def to_message(self) -> dict:
        """JSON-ready; bytes travel as UTF-8 with undecodable bytes escaped."""
        data = dataclasses.asdict(self)
        data["texts"] = {k: v.decode("utf-8", "surrogateescape") for k, v in self.texts.items()}
        return data

    @classmethod
    def from_message(cls, data: dict) -> Bundle:
        texts = {k: v.encode("utf-8", "surrogateescape") for k, v in data["texts"].items()}
        return cls(int(data["generation"]), data["rules_path"], data["config_path"],
                   dict(data["overrides"]), texts, dict(data["identities"]))

    def sources(self) -> Sources:
        return Sources(self.rules_path, self.config_path, self.overrides,
                       files=BundleFiles(self.texts, self.identities))


def build_recorded(src: Sources, previous: Snapshot | None = None,
                   **kw) -> tuple[Snapshot, Bundle]:
    """Build from the disk (raises RulesError/ConfigError) and record what was read."""
    files = RecordingFiles()
    snapshot = build_snapshot(dataclasses.replace(src, files=files), previous, **kw)
    bundle = Bundle(snapshot.generation, src.rules_path, src.config_path,
                    json.loads(json.dumps(src.overrides)), dict(files.texts),
                    dict(files.identities))
    return snapshot, bundle


def build_from_bundle(bundle: Bundle, previous: Snapshot | None = None, **kw) -> Snapshot:
    """The worker's build: the master's texts, the master's generation number."""
    snapshot = build_snapshot(bundle.sources(), previous, **kw)
    return dataclasses.replace(snapshot, generation=bundle.generation)
