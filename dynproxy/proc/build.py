"""Build a Snapshot from files: config (validated), rules (parsed, linted, compiled),
topology (adopting the previous one's member state). Raises on any error and
touches nothing that serves: the caller swaps the result in, or keeps the old one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynproxy.core.config import MAX_FILE_BYTES as CONFIG_MAX_BYTES
from dynproxy.core.config import (
    Config,
    apply_overrides,
    load_config,
    load_config_bytes,
    load_config_file,
)
from dynproxy.core.topology import Topology
from dynproxy.lang import RuleSet, build
from dynproxy.lang.loader import load_program
from dynproxy.lang.peek import PeekPolicy
from dynproxy.net.plugins import entry_point_names, load_plugins
from dynproxy.net.state import Snapshot
from dynproxy.net.tls import cert_store_for
from dynproxy.proc.jobs import carry_redis_members


@dataclass(frozen=True)
class Sources:
    """Where a snapshot comes from; reload reads the same places again."""

    rules_path: str
    config_path: str | None
    overrides: dict
    # Where file texts come from (lang.loader.RuleFiles; None: the disk). The master
    # records what it validated and workers build from that record (proc.bundle).
    files: Any = None


def load_settings(src: Sources) -> Config:
    if not src.config_path:
        cfg = load_config(None)
    elif src.files is None:
        cfg = load_config_file(src.config_path)
    else:
        cfg = _config_from_files(src)
    return apply_overrides(cfg, src.overrides) if src.overrides else cfg


def _config_from_files(src: Sources) -> Config:
    try:
        data = src.files.read(Path(src.config_path), CONFIG_MAX_BYTES)
    except OSError:
        data = None
    if data is None or len(data) > CONFIG_MAX_BYTES:
        return load_config_file(src.config_path)  # it says what is wrong, as always
    return load_config_bytes(data, src.config_path)


def load_rules(src: Sources, cfg: Config) -> RuleSet:
    plugins = {p.name for p in cfg.plugins} | entry_point_names()
    certs = {c.name for c in cfg.tls.certificates if c.name}
    health = {"interval": cfg.health.default_interval, "timeout": cfg.health.default_timeout,
              "rise": cfg.health.default_rise, "fall": cfg.health.default_fall}
    program, diagnostics = load_program(src.rules_path, src.files)
    return build(program, diagnostics, plugins=plugins,
                 certificates=certs if cfg.tls.certificates else None,
                 health_defaults=health)


def build_snapshot(src: Sources, previous: Snapshot | None = None,
                   plugins: dict | None = None) -> Snapshot:
    cfg = load_settings(src)
    rules = load_rules(src, cfg)
    tls = cert_store_for(cfg, rules)  # certificate files read again; raising keeps the old
    topology = Topology(rules.backends, rules.pools, previous.topology if previous else None)
    carry_redis_members(topology, previous.topology if previous else None)  # Redis helper
    return Snapshot(
        rules=rules,
        topology=topology,
        config=cfg,
        generation=(previous.generation + 1) if previous else 1,
        needs_peek=(peek := PeekPolicy(rules)).anywhere,
        peek=peek,
        plugins=dict(plugins if plugins is not None else load_plugins(
            cfg, previous.plugins if previous else None)),
        tls=tls,
    )
