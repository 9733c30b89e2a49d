"""Routing plugins: loading (config module path, entry point, built-in), the routing
contract (an answer, no opinion, or a failure that falls through to the next rule,
counted), and the example plugin in examples/tenant_router.py."""

from __future__ import annotations

import dataclasses
import sys
import textwrap

import gevent
import pytest

from dynproxy.core.config import ConfigError, load_config, load_config_file
from dynproxy.core.config_schema import PluginSpec
from dynproxy.core.decision import Decision, Target
from dynproxy.core.router import ConnInfo
from dynproxy.core.topology import Topology
from dynproxy.lang import load_text
from dynproxy.net.plugins import (
    PluginError,
    balance,
    entry_point_names,
    forward,
    load_plugins,
    reject,
)
from dynproxy.net.routing import route
from dynproxy.net.state import Snapshot
from dynproxy.obs.metrics import init_metrics

CONFIG = load_config(None)


def config_with(*plugins, **redis):
    specs = tuple(PluginSpec(name, module) for name, module in plugins)
    return dataclasses.replace(CONFIG, plugins=specs,
                               redis=dataclasses.replace(CONFIG.redis, **redis))


def snapshot(text: str, plugins: dict, known=("p",)) -> Snapshot:
    rules = load_text(text, "<test>", plugins=set(plugins) | set(known))
    return Snapshot(rules, Topology(rules.backends, rules.pools), CONFIG, 1,
                    needs_peek=True, plugins=plugins)


def conn(sni):
    return ConnInfo("tcp", "10.0.0.1", 443, sni, ())


# loading ------------------------------------------------------------------------------------
@pytest.fixture
def plugin_module(tmp_path, monkeypatch):
    """A module `fakeplugins` with several kinds of objects, plus an installed
    distribution declaring one of them as a dynproxy.plugins entry point."""
    (tmp_path / "fakeplugins.py").write_text(textwrap.dedent('''
        class Router:
            name = "router"
            def route(self, context):
                return None

        instance = Router()

        def factory(config):
            made = Router()
            made.config = config
            return made

        not_a_plugin = 42

        def broken_factory():
            raise RuntimeError("no database")
    '''))
    dist = tmp_path / "fakeplugins-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fakeplugins\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[dynproxy.plugins]\nfrom_ep = fakeplugins:Router\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield
    sys.modules.pop("fakeplugins", None)


def test_config_module_paths_load_classes_instances_and_factories(plugin_module):
    cfg = config_with(("a", "fakeplugins:Router"), ("b", "fakeplugins:instance"),
                      ("c", "fakeplugins:factory"))
    plugins = load_plugins(cfg)
    import fakeplugins

    assert isinstance(plugins["a"], fakeplugins.Router)
    assert plugins["b"] is fakeplugins.instance
    assert plugins["c"].config is cfg


def test_entry_points_load_without_config(plugin_module):
    assert "from_ep" in entry_point_names()
    plugins = load_plugins(CONFIG)
    assert type(plugins["from_ep"]).__name__ == "Router"
    assert "redis_sni" not in plugins  # only with redis.url set


def test_reload_keeps_plugins_whose_origin_did_not_change(plugin_module):
    cfg = config_with(("a", "fakeplugins:Router"))
    first = load_plugins(cfg)
    again = load_plugins(cfg, first)
    assert again["a"] is first["a"]
    moved = load_plugins(config_with(("a", "fakeplugins:factory")), first)
    assert moved["a"] is not first["a"]


def test_redis_sni_is_built_in_when_redis_is_configured():
    plugins = load_plugins(config_with(url="redis://127.0.0.1:1/0"))
    assert plugins["redis_sni"].name == "redis_sni"
    assert load_plugins(config_with(url="redis://127.0.0.1:1/0"), plugins)["redis_sni"] \
        is plugins["redis_sni"]


@pytest.mark.parametrize("module, message", [
    ("nosuchmodule_xyz:Router", "No module named 'nosuchmodule_xyz'"),
    ("fakeplugins:Missing", "has no attribute 'Missing'"),
    ("fakeplugins:not_a_plugin", "it is 42: neither a plugin"),
    ("fakeplugins:broken_factory", "RuntimeError('no database')"),
])
def test_load_errors_say_which_plugin_where_and_why(plugin_module, tmp_path, module, message):
    cfg_file = tmp_path / "dynproxy.yaml"
    cfg_file.write_text(f"plugins:\n  - name: ok\n    module: fakeplugins:Router\n"
                        f"  - name: x\n    module: \"{module}\"\n")
    with pytest.raises(ConfigError) as err:  # stops a start like any config error
        load_plugins(load_config_file(str(cfg_file)))
    assert isinstance(err.value, PluginError) and err.value.plugin == "x"
    text = str(err.value)
    assert f"dynproxy.yaml:5:13: plugins[1].module: cannot load plugin 'x' '{module}'" in text
    assert message in text and "help:" in text


def test_a_broken_entry_point_names_it(plugin_module, tmp_path):
    dist = tmp_path / "fakeplugins-1.0.dist-info" / "entry_points.txt"
    dist.write_text("[dynproxy.plugins]\nbad = fakeplugins:not_a_plugin\n")
    with pytest.raises(PluginError, match="entry point dynproxy.plugins: bad: cannot load"):
        load_plugins(CONFIG)


# the routing contract ------------------------------------------------------------------------
RULES = """
backend web 127.0.0.1:9001
backend spare 127.0.0.1:9002
sni suffix ".apps.example.com" -> plugin(p)
default -> forward(spare)
"""


class Answer:
    name = "p"

    def __init__(self, behaviour):
        self.behaviour = behaviour
        self.seen = []

    def route(self, context):
        self.seen.append(context)
        return self.behaviour()


def _hang():
    gevent.sleep(5)


def _raise():
    raise KeyError("tenant")


@pytest.mark.parametrize("behaviour, reason", [
    (_raise, "exception"),
    (_hang, "timeout"),
    (lambda: "web", "bad_answer"),
    (lambda: forward("nosuchbackend"), "bad_answer"),
    (lambda: Decision("lb", ()), "bad_answer"),
])
def test_a_failing_plugin_falls_through_to_the_next_rule_counted(behaviour, reason):
    plugin = Answer(behaviour)
    snap, metrics = snapshot(RULES, {"p": plugin}), init_metrics(None)
    decision = route(snap, conn("a.apps.example.com"), metrics)
    assert decision.targets == (Target("spare", 1),) and decision.rule.line == 5
    assert metrics.plugin_errors_total.labels("p", reason)._value.get() == 1


def test_no_opinion_falls_through_uncounted_and_an_answer_decides():
    quiet = Answer(lambda: None)
    snap, metrics = snapshot(RULES, {"p": quiet}), init_metrics(None)
    assert route(snap, conn("a.apps.example.com"), metrics).targets[0].name == "spare"
    assert quiet.seen[0].conn.sni == "a.apps.example.com" and quiet.seen[0].snapshot is snap
    assert quiet.seen[0].rule.line == 4
    for answer, expected in ((forward("web"), ("forward", "web")),
                             (balance("web", ("spare", 3)), ("lb", "web")),
                             (reject(), ("reject", None))):
        snap = snapshot(RULES, {"p": Answer(lambda a=answer: a)})
        decision = route(snap, conn("a.apps.example.com"), metrics)
        assert (decision.action, decision.targets[0].name if decision.targets else None) \
            == expected
        assert decision.rule.line == 4  # the plugin's rule is credited
    assert metrics.plugin_errors_total.labels("p", "exception")._value.get() == 0


def test_a_plugin_that_is_not_loaded_falls_through():
    snap, metrics = snapshot(RULES, {}), init_metrics(None)
    assert route(snap, conn("a.apps.example.com"), metrics).targets[0].name == "spare"
    assert metrics.plugin_errors_total.labels("p", "unavailable")._value.get() == 1


# the example plugin ---------------------------------------------------------------------------
def test_the_example_tenant_router():
    plugins = load_plugins(config_with(("tenant_router", "examples.tenant_router:TenantRouter")))
    snap = snapshot("""
        backend tenant-acme 127.0.0.1:9001
        pool tenant-globex { member 127.0.0.1:9002 }
        backend spare 127.0.0.1:9003
        sni suffix ".apps.example.com" -> plugin(tenant_router)
        default -> forward(spare)
    """, plugins)
    metrics = init_metrics(None)
    for sni, target in (("acme.apps.example.com", "tenant-acme"),
                        ("globex.apps.example.com", "tenant-globex"),
                        ("initech.apps.example.com", "spare"),
                        (None, "spare")):
        assert route(snap, conn(sni), metrics).targets[0].name == target, sni
    first = plugins["tenant_router"].route(_context(snap, "acme.apps.example.com"))
    assert plugins["tenant_router"].route(_context(snap, "acme.x")) is first  # reused


def _context(snap, sni):
    from dynproxy.net.routing import RouteContext

    return RouteContext(conn(sni), None, snap)
