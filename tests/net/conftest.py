"""Shared setup for the gevent I/O tests: monkey-patch before anything opens a socket.

The tests under tests/net drive real sockets from several greenlets at once, which
only interleave when the stdlib socket module is gevent's. Patching here (the first
module pytest imports from this directory) keeps pure-logic test directories untouched
when they run on their own.
"""

from gevent import monkey

monkey.patch_all()
