"""Health write-back and the atomic patch: only `healthy` and `last_check` change,
a concurrent operator edit survives, the rest of the JSON round-trips exactly."""

from __future__ import annotations

import json

import gevent
import pytest

from dynproxy.store.client import StoreError, make_client, patch_backend, redacted_url
from dynproxy.store.records import RecordError
from dynproxy.store.writeback import HealthWriter, patch_health

# Fields a cjson round trip would damage: an empty list, a big integer, key order.
STORED = ('{"address": "127.0.0.1:9001", "weight": 100, "healthy": true, '
          '"last_check": 1234567890, "metadata": {"zones": [], "id": 12345678901234567}, '
          '"owner": "ops"}')


@pytest.fixture
def client(redis_server, redis_settings, prefix):
    c = make_client(redis_settings(redis_server.url, prefix))
    yield c
    c.close()


def test_health_patch_changes_only_its_fields(client, prefix):
    key = f"{prefix}backends:web-1"
    client.set(key, STORED)
    patch_backend(client, key, lambda f: patch_health(f, False, 1700000000))
    stored = client.get(key).decode()
    assert stored == STORED.replace('"healthy": true', '"healthy": false').replace(
        '"last_check": 1234567890', '"last_check": 1700000000')


def test_a_concurrent_operator_edit_survives_the_write_back(client, redis_server, prefix):
    key = f"{prefix}backends:web-1"
    client.set(key, STORED)
    operator = redis_server.client()
    edits = []

    def change(fields):
        if not edits:  # the operator writes between our read and our write
            edits.append(1)
            operator.set(key, STORED.replace('"weight": 100', '"weight": 7'))
        return patch_health(fields, False, 1700000000)

    patch_backend(client, key, change)
    stored = json.loads(client.get(key))
    assert stored["weight"] == 7 and stored["healthy"] is False
    assert stored["last_check"] == 1700000000 and stored["owner"] == "ops"
    assert len(edits) == 1


def test_ttl_is_kept_and_a_deleted_key_is_not_recreated(client, prefix):
    key = f"{prefix}backends:web-1"
    client.set(key, STORED, ex=100)
    patch_backend(client, key, lambda f: patch_health(f, True, 1700000000))
    assert 90 < client.ttl(key) <= 100
    client.delete(key)
    assert patch_backend(client, key, lambda f: patch_health(f, True, 1)) is None
    assert client.exists(key) == 0


def test_last_check_never_goes_back():
    assert patch_health({"last_check": 200}, None, 100) == {"last_check": 200}
    assert patch_health({"last_check": 100}, True, 200) == {"last_check": 200, "healthy": True}
    assert patch_health({"last_check": "junk"}, None, 5) == {"last_check": 5}


def test_a_value_that_is_not_an_object_is_left_alone(client, prefix):
    key = f"{prefix}backends:web-1"
    client.set(key, "[1]")
    with pytest.raises(RecordError):
        patch_backend(client, key, lambda f: patch_health(f, True, 1))
    assert client.get(key) == b"[1]"


def test_endless_conflicts_give_up_with_a_clear_error(client, redis_server, prefix):
    key = f"{prefix}backends:web-1"
    client.set(key, STORED)
    operator, n = redis_server.client(), [0]

    def change(fields):
        n[0] += 1
        operator.set(key, STORED.replace('"owner": "ops"', f'"owner": "ops{n[0]}"'))
        return fields

    with pytest.raises(StoreError, match="changed 8 times"):
        patch_backend(client, key, change)


def test_writer_coalesces_and_writes(client, prefix):
    for name in ("a", "b"):
        client.set(f"{prefix}backends:{name}", STORED)
    writer = HealthWriter(client, prefix)
    writer.submit("a", False, 1700000001)
    writer.submit("a", None, 1700000002)  # keeps the pending healthy=False
    writer.submit("b", None, 1700000003)
    writer.submit("gone", True, 1700000004)
    greenlet = gevent.spawn(writer.run)
    try:
        with gevent.Timeout(5):
            while writer.written < 2:
                gevent.sleep(0.01)
    finally:
        greenlet.kill()
    a = json.loads(client.get(f"{prefix}backends:a"))
    b = json.loads(client.get(f"{prefix}backends:b"))
    assert (a["healthy"], a["last_check"]) == (False, 1700000002)
    assert (b["healthy"], b["last_check"]) == (True, 1700000003)
    assert client.exists(f"{prefix}backends:gone") == 0


def test_urls_are_redacted():
    assert redacted_url("redis://:s3cret@10.0.0.1:6380/2") == "redis://:***@10.0.0.1:6380/2"
    assert redacted_url("rediss://u:pw@h/0") == "rediss://u:***@h/0"
    assert redacted_url("redis://h:1/0") == "redis://h:1/0"
