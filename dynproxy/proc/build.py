"""Build a Snapshot from files: config (validated), rules (parsed, linted, compiled),
topology (adopting the previous one's member state). Raises on any error and
touches nothing that serves: the caller swaps the result in, or keeps the old one.
"""

from __future__ import annotations

from dataclasses import dataclass

from dynproxy.core.config import Config, apply_overrides, load_config, load_config_file
from dynproxy.core.topology import Topology
from dynproxy.lang import RuleSet, load_file
from dynproxy.net.state import Snapshot, rules_need_peek


@dataclass(frozen=True)
class Sources:
    """Where a snapshot comes from; reload reads the same places again."""

    rules_path: str
    config_path: str | None
    overrides: dict


def load_settings(src: Sources) -> Config:
    cfg = load_config_file(src.config_path) if src.config_path else load_config(None)
    return apply_overrides(cfg, src.overrides) if src.overrides else cfg


def load_rules(src: Sources, cfg: Config) -> RuleSet:
    plugins = {p.name for p in cfg.plugins}
    certs = {c.name for c in cfg.tls.certificates if c.name}
    health = {"interval": cfg.health.default_interval, "timeout": cfg.health.default_timeout,
              "rise": cfg.health.default_rise, "fall": cfg.health.default_fall}
    return load_file(src.rules_path, plugins=plugins,
                     certificates=certs if cfg.tls.certificates else None,
                     health_defaults=health)


def build_snapshot(src: Sources, previous: Snapshot | None = None,
                   plugins: dict | None = None) -> Snapshot:
    cfg = load_settings(src)
    rules = load_rules(src, cfg)
    topology = Topology(rules.backends, rules.pools, previous.topology if previous else None)
    return Snapshot(
        rules=rules,
        topology=topology,
        config=cfg,
        generation=(previous.generation + 1) if previous else 1,
        needs_peek=rules_need_peek(rules),
        plugins=dict(plugins if plugins is not None else (previous.plugins if previous else {})),
        tls=previous.tls if previous else None,
    )
