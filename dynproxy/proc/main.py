"""Start serving from files: `dynproxy run` lands here and hands over to the master.

There is one way to serve, whatever the number of workers: a master that validates
and supervises, and worker processes that serve (`--workers 1` is a master and one
worker). Errors in the rules or config propagate (RulesError, ConfigError) for the
command line to show; a proxy that cannot start says why and returns 1.
"""

from __future__ import annotations

import sys

from dynproxy.proc.build import Sources
from dynproxy.proc.master import Master, StartError


def serve_main(src: Sources) -> int:
    try:
        # jobs wiring (Redis helper): the master runs health checks and the Redis
        # watcher once and forwards their events to the workers (proc.master).
        return Master(src).run()
    except StartError as exc:
        print(f"dynproxy: not starting: {exc}", file=sys.stderr)
        return 1
