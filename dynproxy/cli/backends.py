"""`dynproxy backends list|add|rm|set-weight|drain`: manage Redis backends by hand.

Every change is validated before anything is written, written as the same JSON
operators write with redis-cli, printed as a table, and announced on the change
channel so that every running proxy applies it within a second (plain redis-cli
changes wait for the next rescan). `set-weight` and `drain` change only the weight
(and a note in metadata) with the atomic patch the proxies' health write-backs use,
so they never undo a concurrent write of other fields.

Exit codes: 0 done, 1 Redis unreachable or a backend not found, 2 bad input.
No gevent here: plain blocking sockets.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time

import click

from dynproxy.cli.number_args import SignedArgsCommand, WholeNumber
from dynproxy.store.records import DEFAULT_WEIGHT, MAX_WEIGHT, RecordError

DEFAULT_URL = "redis://127.0.0.1:6379/0"
DRAINED_FROM = "drained_weight"  # metadata field remembering the weight before `drain`
WEIGHT_NOTE = "0 = drained: no new connections"


class _Store:
    """The Redis settings and client one command works with."""

    def __init__(self, settings):
        from dynproxy.store.client import make_client

        self.settings = settings
        self.prefix = settings.key_prefix
        self.client = make_client(settings)

    def key(self, name: str) -> str:
        return f"{self.prefix}backends:{name}"

    def announce(self, op: str, names: list[str]) -> None:
        message = json.dumps({"op": op, "names": names, "by": "dynproxy backends"})
        self.client.publish(self.settings.channel, message)


@click.group()
@click.option("--redis", "url", envvar="DYNPROXY_REDIS_URL", metavar="URL",
              help=f"Redis URL (redis:// or rediss://) [default: redis.url of --config, "
                   f"else $DYNPROXY_REDIS_URL, else {DEFAULT_URL}]")
@click.option("--prefix", metavar="P", help="Key prefix [default: redis.key_prefix, 'proxy:']")
@click.option("--config", "config_path", type=click.Path(dir_okay=False, exists=True),
              help="Take the redis section (url, key_prefix, channel) from this config.")
@click.pass_context
def backends(ctx, url, prefix, config_path):
    """List and change the backends proxies read from Redis (keys PREFIXbackends:NAME)."""
    from dynproxy.core.config import ConfigError, load_config, load_config_file
    from dynproxy.core.config_values import Invalid, RedisUrl

    try:
        settings = (load_config_file(config_path) if config_path else load_config(None)).redis
        url = url or settings.url or DEFAULT_URL
        RedisUrl().convert(url)
    except ConfigError as err:
        raise click.UsageError(str(err)) from None
    except Invalid as err:
        raise click.BadParameter(f"{url!r} is not {RedisUrl.expected}"
                                 + (f": {err.reason}" if err.reason else ""),
                                 param_hint="--redis") from None
    ctx.obj = dataclasses.replace(settings, url=url, key_prefix=prefix or settings.key_prefix)


def _store(ctx) -> _Store:
    return _Store(ctx.obj)


def _fail(message: str) -> None:
    click.echo(f"dynproxy backends: {message}", err=True)
    sys.exit(1)


# list -------------------------------------------------------------------------------------------
@backends.command("list")
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per backend.")
@click.pass_context
def list_(ctx, pattern, as_json):
    """Show backends whose name matches PATTERN (a Redis glob, default *)."""
    store = _store(ctx)
    with _redis_errors(store):
        rows = _rows(store, pattern)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(_table(rows))


def _rows(store: _Store, pattern: str) -> list[dict]:
    from dynproxy.store.records import BackendRecord, key_glob, parse_record

    match = key_glob(store.prefix)[:-1] + pattern
    keys = sorted(store.client.scan_iter(match=match, count=1000))
    start = len(store.key(""))
    pipe = store.client.pipeline(transaction=False)
    for key in keys:
        pipe.get(key)
        pipe.ttl(key)
    answers = pipe.execute() if keys else []
    rows = []
    for key, raw, ttl in zip(keys, answers[::2], answers[1::2], strict=True):
        if raw is None:
            continue
        name = key[start:].decode(errors="replace")
        parsed = parse_record(name, raw)
        if isinstance(parsed, BackendRecord):
            rows.append({"name": name, "address": parsed.address, "weight": parsed.weight,
                         "healthy": parsed.healthy, "last_check": parsed.last_check,
                         "ttl": ttl if ttl >= 0 else None, "problem": None})
        else:
            rows.append({"name": name, "address": None, "weight": None, "healthy": None,
                         "last_check": None, "ttl": ttl if ttl >= 0 else None,
                         "problem": parsed.message})
    return rows


def _table(rows: list[dict]) -> str:
    head = ("NAME", "ADDRESS", "WEIGHT", "HEALTHY", "LAST CHECK", "TTL")
    lines = [head] + [_cells(r) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
           for line in lines]
    out += [f"! {r['name']}: skipped by proxies: {r['problem']}" for r in rows if r["problem"]]
    return "\n".join(out) if rows else "\n".join(out + ["(no backends)"])


def _cells(row: dict) -> tuple[str, ...]:
    if row["problem"]:
        return (row["name"], "(invalid)", "-", "-", "-", _ttl(row["ttl"]))
    healthy = "yes" if row["healthy"] else "no"
    weight = str(row["weight"]) + (" (drained)" if row["weight"] == 0 else "")
    return (row["name"], row["address"], weight, healthy, _when(row["last_check"]),
            _ttl(row["ttl"]))


def _when(epoch: float | None) -> str:
    if not epoch:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _ttl(ttl: int | None) -> str:
    return "-" if ttl is None else f"{ttl}s"


# changes ------------------------------------------------------------------------------------------
@backends.command()
@click.argument("name")
@click.argument("address")
@click.option("--weight", default=DEFAULT_WEIGHT, show_default=True,
              type=WholeNumber("a weight", 0, MAX_WEIGHT, "--weight 5", WEIGHT_NOTE),
              help=f"Share of new connections (0..{MAX_WEIGHT}; 0 = drained).")
@click.option("--unhealthy", is_flag=True, help='Write "healthy": false.')
@click.option("--metadata", metavar="JSON", default="{}", help="A JSON object to keep with it.")
@click.option("--ttl", type=WholeNumber("a time to live in seconds", 1, None, "--ttl 60"),
              metavar="SECONDS",
              help="Let the key expire (the proxies drop the backend when it does).")
@click.pass_context
def add(ctx, name, address, weight, unhealthy, metadata, ttl):
    """Add (or replace) backend NAME at ADDRESS (HOST:PORT or [V6]:PORT)."""
    from dynproxy.store.records import encode_record

    fields = _validated(name, address, weight, metadata)
    fields["healthy"] = not unhealthy
    store = _store(ctx)
    with _redis_errors(store):
        existed = store.client.set(store.key(name), encode_record(fields), ex=ttl, get=True)
        store.announce("add", [name])
        rows = _rows(store, _glob_literal(name))
    click.echo(f"{'replaced' if existed is not None else 'added'} {store.key(name)}")
    click.echo(_table(rows))


def _validated(name: str, address: str, weight: int, metadata: str) -> dict:
    from dynproxy.store.records import parse_address, validate_name

    try:
        validate_name(name)
        parse_address(address)
        meta = json.loads(metadata)
    except RecordError as err:
        raise click.BadParameter(str(err)) from None
    except ValueError as err:
        raise click.BadParameter(f"{metadata!r} is not JSON: {err}",
                                 param_hint="--metadata") from None
    if not isinstance(meta, dict):
        raise click.BadParameter(f"{metadata!r} must be a JSON object",
                                 param_hint="--metadata")
    return {"address": address, "weight": weight, "healthy": True, "last_check": None,
            "metadata": meta}


@backends.command()
@click.argument("names", nargs=-1, required=True)
@click.pass_context
def rm(ctx, names):
    """Remove backends (their open connections finish unless redis.close_removed)."""
    store = _store(ctx)
    with _redis_errors(store):
        missing = [n for n in names if not store.client.delete(store.key(n))]
        removed = [n for n in names if n not in missing]
        if removed:
            store.announce("rm", removed)
    for name in removed:
        click.echo(f"removed {store.key(name)}")
    if missing:
        _fail(f"no such backend: {', '.join(map(repr, missing))} (see `dynproxy backends list`)")


@backends.command("set-weight", cls=SignedArgsCommand)
@click.argument("name")
@click.argument("weight", type=WholeNumber("a weight", 0, MAX_WEIGHT,
                                           "`dynproxy backends set-weight web-1 5`",
                                           WEIGHT_NOTE))
@click.pass_context
def set_weight(ctx, name, weight):
    """Set NAME's weight (also ends a drain); other fields are left as they are.

    WEIGHT is a whole number from 0 (drained) to 1000000, e.g. `set-weight web-1 5`."""
    def change(fields: dict) -> dict:
        fields["weight"] = weight
        if isinstance(fields.get("metadata"), dict):
            fields["metadata"].pop(DRAINED_FROM, None)
        return fields

    _patch(ctx, name, "set-weight", change)


@backends.command()
@click.argument("name")
@click.pass_context
def drain(ctx, name):
    """Send NAME no new connections (weight 0; its open connections finish).
    `set-weight NAME W` brings it back; the old weight is kept in metadata."""
    def change(fields: dict) -> dict:
        if fields.get("weight"):
            meta = fields.get("metadata") if isinstance(fields.get("metadata"), dict) else {}
            fields["metadata"] = {**meta, DRAINED_FROM: fields["weight"]}
        fields["weight"] = 0
        return fields

    _patch(ctx, name, "drain", change)


def _patch(ctx, name: str, op: str, change) -> None:
    from dynproxy.store.client import StoreError, patch_backend

    store = _store(ctx)
    with _redis_errors(store):
        try:
            fields = patch_backend(store.client, store.key(name), change)
        except (RecordError, StoreError) as err:
            _fail(f"{store.key(name)}: {err}")
        if fields is None:
            _fail(f"no such backend {name!r} (key {store.key(name)!r}); add it with "
                  "`dynproxy backends add NAME HOST:PORT`")
        store.announce(op, [name])
        rows = _rows(store, _glob_literal(name))
    click.echo(_table(rows))


def _glob_literal(name: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in name)


class _redis_errors:
    """Turns Redis being unreachable into one clear line and exit code 1."""

    def __init__(self, store: _Store):
        self.store = store

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from dynproxy.store.client import REDIS_ERRORS, redacted_url

        if exc is not None and isinstance(exc, REDIS_ERRORS):
            _fail(f"Redis at {redacted_url(self.store.settings.url)} failed: {exc}; check "
                  "--redis (or redis.url) and that Redis is running")
        return False
