"""Routing plugins: the public interface, and loading them by entry point or config.

A plugin is any object with a `name` and a `route(context)` method::

    from dynproxy.net.plugins import forward, reject

    class TenantRouter:
        name = "tenant_router"

        def route(self, context):          # context: dynproxy.net.routing.RouteContext
            sni = context.conn.sni          # also .src, .dport, .proto, .alpn
            if sni and sni.startswith("acme."):
                return forward("acme")      # a backend or pool of the rules
            return None                     # no opinion: the next rule decides

Rules call it as an action: `sni suffix ".apps.example.com" -> plugin(tenant_router)`.
`route` runs in the connection's greenlet under a deadline (routing.PLUGIN_DEADLINE),
may do cooperative I/O (gevent sockets, redis-py), and returns a Decision (see
`forward`, `balance`, `reject`) or None. Raising, overrunning the deadline or
returning anything else is counted (`proxy_plugin_errors_total`), logged, and the
next rule decides: a plugin can never take a connection down.

Where plugins come from:
- the config: `plugins: [{name: tenant_router, module: "mycompany.routing:TenantRouter"}]`;
- installed packages declaring an entry point in group `dynproxy.plugins`
  (`tenant_router = "mycompany.routing:TenantRouter"`);
- built in: `redis_sni` (store.redis_sni), present when `redis.url` is set.
The object named may be a plugin, or a class or factory that returns one: called with
the Config when it has one required parameter, else with no argument.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Any, Protocol, runtime_checkable

from dynproxy.core.config_problems import ConfigError, ConfigProblem
from dynproxy.core.decision import Decision, Target

__all__ = ["ENTRY_POINT_GROUP", "Plugin", "PluginError", "balance", "entry_point_names",
           "forward", "load_plugins", "reject"]

ENTRY_POINT_GROUP = "dynproxy.plugins"


@runtime_checkable
class Plugin(Protocol):
    name: str

    def route(self, context: Any) -> Decision | None: ...


class PluginError(ConfigError):
    """A plugin cannot be loaded: a configuration error (one problem) saying which
    plugin, from where (the config line, or the entry point), and why."""

    def __init__(self, name: str, origin: str, config, detail: str):
        self.plugin = name
        super().__init__([_problem(name, origin, config, detail)])


def _problem(name: str, origin: str, config, detail: str) -> ConfigProblem:
    index = next((i for i, p in enumerate(config.plugins) if p.name == name), None)
    hint = ("check the module path (package.module:attribute) and that the package is "
            "installed in this Python")
    if index is None:  # an entry point of an installed package
        return ConfigProblem(f"entry point {ENTRY_POINT_GROUP}", None, None, name,
                             f"cannot load plugin {name!r}", repr(origin),
                             "an object with route(context), or a class or factory making one",
                             hint, detail)
    origin_info = config.origin
    mark = origin_info.marks.find(("plugins", index, "module")) if origin_info else None
    return ConfigProblem(origin_info.source if origin_info else "<config>",
                         mark.line if mark else None, mark.column if mark else None,
                         f"plugins[{index}].module", f"cannot load plugin {name!r}",
                         repr(origin), "package.module:attribute naming a plugin, or a "
                         "class or factory making one", hint, detail)


def forward(target: str) -> Decision:
    """Send the connection to the backend or pool named `target`."""
    return Decision("forward", (Target(target, 1),))


def balance(*targets: str | tuple[str, int], algo: str = "wrr",
            hash_key: str | None = None) -> Decision:
    """Balance over named backends/pools: `balance("a", ("b", 3))`."""
    parsed = tuple(Target(t, 1) if isinstance(t, str) else Target(t[0], t[1]) for t in targets)
    return Decision("lb", parsed, algo, hash_key)


def reject() -> Decision:
    return Decision("reject")


def entry_point_names() -> frozenset[str]:
    """Names of the plugins installed packages declare (without importing them)."""
    return frozenset(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def load_plugins(config, previous: dict | None = None) -> dict[str, Plugin]:
    """Every plugin rules may call, by name. On reload, pass the previous dict: plugins
    whose origin did not change are kept (with their caches and connections)."""
    previous = previous or {}
    origins: dict[str, str] = {ep.name: ep.value for ep in
                               entry_points(group=ENTRY_POINT_GROUP)}
    origins.update({p.name: p.module for p in config.plugins})
    plugins = {name: _reuse_or_load(name, origin, config, previous)
               for name, origin in origins.items()}
    if config.redis.url:
        plugins["redis_sni"] = _redis_sni(config, previous.get("redis_sni"))
    return plugins


def _reuse_or_load(name: str, origin: str, config, previous: dict) -> Plugin:
    old = previous.get(name)
    if old is not None and getattr(old, "_dynproxy_origin", None) == origin:
        return old
    plugin = _load(name, origin, config)
    try:
        plugin._dynproxy_origin = origin
    except AttributeError:  # slots or a module: then it is simply loaded again next time
        pass
    return plugin


def _load(name: str, origin: str, config) -> Plugin:
    module_name, _, attr = origin.partition(":")
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split(".") if attr else ():
            obj = getattr(obj, part)
    except Exception as exc:  # noqa: BLE001 - any import failure becomes one clear error
        raise PluginError(name, origin, config, f"importing it raised {exc!r}") from exc
    is_plugin = not inspect.isclass(obj) and callable(getattr(obj, "route", None))
    plugin = obj if is_plugin else _instantiate(name, origin, obj, config)
    if not callable(getattr(plugin, "route", None)):
        raise PluginError(name, origin, config, f"it gave {plugin!r:.80}, which has no "
                          "route(context) method")
    return plugin


def _instantiate(name: str, origin: str, factory, config):
    if not callable(factory):
        raise PluginError(name, origin, config, f"it is {factory!r:.80}: neither a plugin "
                          "nor a class or factory")
    try:
        required = [p for p in inspect.signature(factory).parameters.values()
                    if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY,
                                                           p.POSITIONAL_OR_KEYWORD)]
        takes_config = len(required) == 1
        return factory(config) if takes_config else factory()
    except Exception as exc:  # noqa: BLE001 - a broken factory is a load error
        raise PluginError(name, origin, config, f"creating it raised {exc!r}") from exc


def _redis_sni(config, old):
    from dynproxy.store.redis_sni import RedisSni

    if isinstance(old, RedisSni) and old.settings == config.redis:
        return old
    return RedisSni(config.redis)
