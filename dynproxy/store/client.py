"""Talking to Redis: a client built from the `redis` config section, and the atomic
field patch used by health write-backs and `dynproxy backends`.

The patch is compare-and-set: read the value, change only the wanted fields in
Python (every other byte of the operator's JSON round-trips exactly), and write it
with a Lua script that replaces the value only if it is still what was read (keeping
its TTL); on a concurrent edit, read again and retry. A script that decodes and
re-encodes with Redis' cjson would turn `[]` into `{}` and big integers into floats in
fields the proxy does not own, which is why it is not used.

No gevent here: the CLI uses this module with blocking sockets, the proxy with
gevent's patched ones. Never log the URL unredacted (it may carry a password).
"""

from __future__ import annotations

from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

from dynproxy.store.records import encode_record, record_fields

__all__ = ["REDIS_ERRORS", "StoreError", "backend_key", "make_client", "patch_backend",
           "redacted_url"]

# What a Redis outage looks like to callers (connection refused, timeout, loading...).
REDIS_ERRORS = (redis.RedisError, OSError)
PATCH_ATTEMPTS = 8

_CAS_SCRIPT = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2], 'KEEPTTL')
return 1
"""


class StoreError(Exception):
    """A Redis write could not be done (kept conflicting with other writers)."""


def make_client(settings, *, retries: int | None = None) -> redis.Redis:
    """A client for `settings` (the config's `redis` section); connects lazily."""
    timeout = settings.timeout_ms / 1000
    attempts = settings.max_retries if retries is None else retries
    pool = redis.BlockingConnectionPool.from_url(
        settings.url, max_connections=settings.pool_size, timeout=timeout,
        socket_timeout=timeout, socket_connect_timeout=timeout,
        retry=Retry(ExponentialWithJitterBackoff(base=0.01, cap=timeout), attempts))
    return redis.Redis(connection_pool=pool)


def backend_key(prefix: str, name: str) -> str:
    return f"{prefix}backends:{name}"


def patch_backend(client: redis.Redis, key: str,
                  change: Callable[[dict[str, Any]], dict[str, Any]]) -> dict[str, Any] | None:
    """Apply `change` (old fields -> new fields) to the JSON under `key` atomically.

    Returns the new fields, or None when the key does not exist (it is never
    recreated: a deleted backend stays deleted). Raises RecordError when the stored
    value is not a JSON object, StoreError when other writers kept winning.
    """
    cas = client.register_script(_CAS_SCRIPT)
    for _ in range(PATCH_ATTEMPTS):
        raw = client.get(key)
        if raw is None:
            return None
        fields = change(dict(record_fields(raw)))
        if cas(keys=[key], args=[raw, encode_record(fields)]) == 1:
            return fields
    raise StoreError(f"{key!r} changed {PATCH_ATTEMPTS} times while being updated; "
                     "try again")


def redacted_url(url: str | None) -> str:
    """The URL without its password, for logs and messages."""
    if not url:
        return repr(url)
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    host = f"[{host}]" if ":" in host else host
    netloc = (f"{parts.username}:***@" if parts.username else ":***@") + host + (
        f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))
