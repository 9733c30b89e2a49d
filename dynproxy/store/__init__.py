"""Redis: backend records, the watcher (local copy + change feed), health write-back,
and the redis_sni routing plugin's cache. The pure parts (records, cache) import no
redis, gevent or socket; see docs/redis.md for the operator's view."""
