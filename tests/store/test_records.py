"""Backend JSON as operators write it: what is accepted, what is skipped and why,
Redis-style globs, and the bounded cache (pure: no Redis needed)."""

from __future__ import annotations

import json

import pytest

from dynproxy.store.cache import MISSING, TtlCache
from dynproxy.store.records import (
    SKIP_REASONS,
    BackendRecord,
    Skipped,
    key_glob,
    parse_address,
    parse_record,
    redis_glob,
)

OPERATOR_JSON = ('{"address": "127.0.0.1:8080", "weight": 100, "healthy": true, '
                 '"last_check": 1234567890, "metadata": {}}')


def test_the_operators_example_parses():
    record = parse_record("web-1", OPERATOR_JSON.encode())
    assert record == BackendRecord("web-1", "127.0.0.1", 8080, 100, True, 1234567890.0)
    assert record.address == "127.0.0.1:8080"


@pytest.mark.parametrize("value, expected", [
    ({"address": "[::1]:9001"}, ("::1", 9001, 100, True, None)),
    ({"address": "db.internal:5432", "weight": 0}, ("db.internal", 5432, 0, True, None)),
    ({"address": "10.0.0.7:1", "healthy": False, "last_check": 1.5},
     ("10.0.0.7", 1, 100, False, 1.5)),
    ({"address": "10.0.0.7:65535", "extra": [1, 2], "metadata": None},
     ("10.0.0.7", 65535, 100, True, None)),
])
def test_valid_values(value, expected):
    record = parse_record("b", json.dumps(value))
    assert (record.host, record.port, record.weight, record.healthy,
            record.last_check) == expected


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "invalid_json"),
    (b"\xff\xfe", "invalid_json"),
    (b"[1, 2]", "not_object"),
    (b'"127.0.0.1:80"', "not_object"),
    (b'{"weight": 1}', "bad_address"),
    (b'{"address": 8080}', "bad_address"),
    (b'{"address": "127.0.0.1"}', "bad_address"),
    (b'{"address": "127.0.0.1:0"}', "bad_address"),
    (b'{"address": "127.0.0.1:70000"}', "bad_address"),
    (b'{"address": "::1:80"}', "bad_address"),
    (b'{"address": "[nope]:80"}', "bad_address"),
    (b'{"address": "bad host:80"}', "bad_address"),
    (b'{"address": "127.0.0.1:80", "weight": -1}', "bad_weight"),
    (b'{"address": "127.0.0.1:80", "weight": "100"}', "bad_weight"),
    (b'{"address": "127.0.0.1:80", "weight": 1.5}', "bad_weight"),
    (b'{"address": "127.0.0.1:80", "weight": true}', "bad_weight"),
    (b'{"address": "127.0.0.1:80", "healthy": "yes"}', "bad_healthy"),
    (b'{"address": "127.0.0.1:80", "healthy": 1}', "bad_healthy"),
    (b'{"address": "127.0.0.1:80", "last_check": "today"}', "bad_last_check"),
    (b'{"address": "127.0.0.1:80", "last_check": -5}', "bad_last_check"),
    (b'{"address": "127.0.0.1:80", "last_check": NaN}', "bad_last_check"),
    (b'{"address": "127.0.0.1:80", "metadata": []}', "bad_metadata"),
    (b'{"address": "127.0.0.1:80", "pad": "' + b"x" * 70000 + b'"}', "too_large"),
])
def test_invalid_values_are_skipped_with_a_reason(raw, reason):
    result = parse_record("web-1", raw)
    assert isinstance(result, Skipped)
    assert result.reason == reason
    assert reason in SKIP_REASONS
    assert result.message  # a sentence for the log line


def test_skip_messages_show_the_bad_value():
    result = parse_record("web-1", b'{"address": "127.0.0.1:80", "weight": -3}')
    assert "-3" in result.message and "0..1000000" in result.message


@pytest.mark.parametrize("name", ["", "has space", "tab\there", "x" * 254])
def test_bad_names(name):
    assert parse_record(name, OPERATOR_JSON).reason == "bad_name"


def test_parse_address_forms():
    assert parse_address("[2001:db8::1]:443") == ("2001:db8::1", 443)
    assert parse_address("example.com.:443") == ("example.com.", 443)


@pytest.mark.parametrize("pattern, yes, no", [
    ("web-*", ["web-1", "web-", "web-a-b"], ["web", "api-1", "xweb-1"]),
    ("web-?", ["web-1"], ["web-12", "web-"]),
    ("web-[12]", ["web-1", "web-2"], ["web-3"]),
    ("web-[^1]", ["web-2"], ["web-1"]),
    ("web-[a-c]x", ["web-bx"], ["web-dx"]),
    (r"a\*b", ["a*b"], ["axb"]),
    ("*.example.com", ["a.example.com", "a.b.example.com"], ["example.com"]),
    ("a.b", ["a.b"], ["axb"]),
])
def test_redis_glob(pattern, yes, no):
    compiled = redis_glob(pattern)
    assert all(compiled.fullmatch(n) for n in yes), yes
    assert not any(compiled.fullmatch(n) for n in no), no


def test_key_glob_escapes_the_prefix():
    assert key_glob("proxy:") == "proxy:backends:*"
    assert key_glob("a*[b]:") == r"a\*\[b\]:backends:*"


def test_ttl_cache_fresh_stale_missing_and_bounded():
    cache = TtlCache(ttl=10, max_entries=2)
    assert cache.get("a", 0) == (MISSING, False)
    cache.put("a", None, now=0)  # a negative answer is a value too
    assert cache.get("a", 5) == (None, True)
    assert cache.get("a", 10) == (None, False)  # stale, still returned
    cache.put("b", 1, 0)
    cache.put("c", 2, 0)
    assert len(cache) == 2 and cache.get("a", 0) == (MISSING, False)
    cache.invalidate(["b"])
    assert cache.get("b", 0)[0] is MISSING and cache.get("c", 0) == (2, True)
    cache.invalidate(None)
    assert len(cache) == 0
