"""Sans-I/O reader of the TLS ClientHello that opens a connection.

The proxy peeks at the first bytes of a TCP stream to learn the SNI and ALPN the
client asks for, without decrypting anything.  ``ClientHelloParser.feed(data)``
accumulates bytes and answers ``NEED_MORE``, ``ClientHello``, ``NotTLS`` (route as
plain TCP) or ``Malformed`` (looked like TLS, but is broken or oversized).

It copes with any TCP segmentation and with a ClientHello split across several
TLS records (large post-quantum key shares do that).  Non-TLS traffic is
recognised from its first byte, so plain protocols are never kept waiting.

This module must never do I/O or import gevent, socket, ssl or redis, and no
exception may escape ``feed`` for any byte input.  A complete ClientHello in one
chunk is parsed in a single pass over memoryview slices, without copying it and
without Python loops over bytes (only over records, extensions and list items).
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

__all__ = ["NEED_MORE", "ClientHello", "ClientHelloParser", "FeedResult", "Malformed", "NeedMore", "NotTLS"]

RECORD_HEADER_SIZE = 5
HANDSHAKE_HEADER_SIZE = 4
CONTENT_TYPE_HANDSHAKE = 22
HANDSHAKE_TYPE_CLIENT_HELLO = 1
# RFC 8446 5.1 caps plaintext at 2^14; TLS 1.2 allows 2048 more for compressed
# records, and we accept that much slack before calling the stream broken.
MAX_RECORD_PAYLOAD = 2**14 + 2048

EXT_SERVER_NAME = 0
EXT_ALPN = 16
EXT_SUPPORTED_VERSIONS = 43
_WANTED_EXTENSIONS = frozenset((EXT_SERVER_NAME, EXT_ALPN, EXT_SUPPORTED_VERSIONS))
_EXT_HEADER = struct.Struct(">HH")
SNI_HOST_NAME = 0
MAX_HOST_NAME = 255
MAX_SESSION_ID = 32

# Letters, digits, hyphen, dot; underscore too, because real names carry it
# (service labels) and backends accept it.  bytes.translate deletes these, so
# whatever survives is a forbidden byte, found without a Python loop.
_HOST_BYTES = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._"
_LONG_LABEL = re.compile(rb"[^.]{64}")


class NeedMore:
    """The answer "not decided yet: feed more bytes"; use the ``NEED_MORE`` singleton."""

    __slots__ = ()
    _instance: NeedMore | None = None

    def __new__(cls) -> NeedMore:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "NEED_MORE"

    def __reduce__(self) -> str:
        return "NEED_MORE"


NEED_MORE = NeedMore()


@dataclass(frozen=True, slots=True)
class NotTLS:
    """The first bytes are not a TLS handshake record: route the stream as plain TCP."""

    reason: str


@dataclass(frozen=True, slots=True)
class Malformed:
    """Looked like TLS but is broken or oversized: the caller counts it and logs once."""

    reason: str


@dataclass(frozen=True, slots=True)
class ClientHello:
    """What the router needs from a ClientHello.

    ``sni`` is lower-cased ASCII (A-labels) with one trailing dot stripped, or None
    without a server_name.  ``alpn`` holds the offered protocols in client order,
    decoded as latin-1 (lossless for any byte).  ``versions`` is the
    supported_versions list if present, else ``(legacy_version,)``.  GREASE values
    in ``versions`` and ``cipher_suites`` are kept as sent.  ``size`` counts the
    stream bytes of the records that carried the ClientHello.
    """

    sni: str | None
    alpn: tuple[str, ...]
    versions: tuple[int, ...]
    legacy_version: int
    cipher_suites: tuple[int, ...]
    size: int


FeedResult = NeedMore | ClientHello | NotTLS | Malformed


class _Verdict(Exception):
    """Internal: a final NotTLS/Malformed answer found deep inside the parse."""

    def __init__(self, result: NotTLS | Malformed) -> None:
        super().__init__(result.reason)
        self.result = result


def _broken(reason: str) -> _Verdict:
    return _Verdict(Malformed(reason))


class ClientHelloParser:
    """Incremental ClientHello reader for one connection (see the module docstring)."""

    __slots__ = ("_max_size", "_buf", "_pos", "_frags", "_hs_have", "_hs_need", "_result")

    def __init__(self, max_size: int = 65536) -> None:
        if type(max_size) is not int or max_size < 64:
            raise ValueError(f"max_size must be an int of at least 64 bytes, got {max_size!r}")
        self._max_size = max_size
        self._buf: bytearray | None = None  # bytes kept between feeds, at most max_size
        self._pos = 0  # stream offset of the next record header
        self._frags: list[tuple[int, int]] = []  # handshake payload spans in the stream
        self._hs_have = 0  # handshake bytes collected from complete records
        self._hs_need: int | None = None  # header + body length, once the header is read
        self._result: FeedResult | None = None

    def feed(self, data: bytes) -> FeedResult:
        """Add the next bytes of the stream; answer as early as the bytes allow.

        After a final answer, further calls return that same answer.
        ``data`` must be bytes-like; anything else raises TypeError (a caller bug).
        """
        if self._result is not None:
            return self._result
        incoming = memoryview(data)
        if self._buf is None:
            return self._feed_first(incoming)
        room = self._max_size - len(self._buf)
        self._buf += incoming[:room] if room < len(incoming) else incoming
        return self._decide(memoryview(self._buf))

    def _feed_first(self, incoming: memoryview) -> FeedResult:
        # Common case: the whole ClientHello in the first segment, parsed in place.
        result = self._decide(incoming)
        if result is NEED_MORE:
            self._buf = bytearray(incoming[: self._max_size])
        return result

    def _decide(self, view: memoryview) -> FeedResult:
        try:
            result = self._advance(view)
        except _Verdict as verdict:
            result = verdict.result
        except Exception as exc:  # safety net; the fuzz tests assert it never fires
            result = Malformed(f"internal parser error {exc!r}; please report with the bytes")
        if result is not NEED_MORE:
            self._result, self._buf, self._frags = result, None, []
        return result

    def _advance(self, view: memoryview) -> FeedResult:
        while True:
            length = self._record_header(view)
            if length is None:
                return NEED_MORE
            start = self._pos + RECORD_HEADER_SIZE
            end = start + length
            if self._hs_need is None:
                self._check_handshake_header(view, start, min(end, len(view)))
            if end > len(view):
                return NEED_MORE
            self._frags.append((start, end))
            self._hs_have += length
            self._pos = end
            if self._hs_need is not None and self._hs_have >= self._hs_need:
                return self._finish(view)

    def _record_header(self, view: memoryview) -> int | None:
        """Validate the next record header as far as it has arrived; its length or None."""
        pos, first = self._pos, self._pos == 0
        if pos + RECORD_HEADER_SIZE > self._max_size:
            raise _broken(f"ClientHello is still incomplete at {pos} bytes; max_size is {self._max_size}")
        avail = len(view) - pos
        if avail < 1:
            return None
        if view[pos] != CONTENT_TYPE_HANDSHAKE:
            raise _record_type_verdict(view[pos], pos, first)
        if avail < 2:
            return None
        if view[pos + 1] != 3:
            raise _record_version_verdict(view[pos + 1], pos, first)
        if avail < RECORD_HEADER_SIZE:
            return None
        return self._record_length(view[pos + 3] << 8 | view[pos + 4], pos)

    def _record_length(self, length: int, pos: int) -> int:
        if length == 0:
            raise _broken(f"empty handshake record at offset {pos} (forbidden by RFC 8446 5.1)")
        if length > MAX_RECORD_PAYLOAD:
            raise _broken(f"record at offset {pos} declares {length} bytes, over the TLS limit {MAX_RECORD_PAYLOAD}")
        end = pos + RECORD_HEADER_SIZE + length
        if end > self._max_size:
            raise _broken(f"record at offset {pos} would end at byte {end}, over max_size {self._max_size}")
        return length

    def _check_handshake_header(self, view: memoryview, start: int, end: int) -> None:
        """Check the handshake type and length as soon as their bytes are here."""
        head = b""
        for s, e in (*self._frags, (start, end)):  # at most 4 spans: each holds >= 1 byte
            head += view[s : min(e, s + HANDSHAKE_HEADER_SIZE - len(head))]
        if head and head[0] != HANDSHAKE_TYPE_CLIENT_HELLO:
            raise _broken(f"handshake message type {head[0]} where ClientHello (1) was expected")
        if len(head) < HANDSHAKE_HEADER_SIZE:
            return
        body_len = int.from_bytes(head[1:4], "big")
        smallest = RECORD_HEADER_SIZE + HANDSHAKE_HEADER_SIZE + body_len
        if smallest > self._max_size:
            raise _broken(f"ClientHello declares {body_len} bytes, so needs at least {smallest}; max_size is {self._max_size}")
        self._hs_need = HANDSHAKE_HEADER_SIZE + body_len

    def _finish(self, view: memoryview) -> ClientHello:
        need = self._hs_need
        assert need is not None
        if len(self._frags) == 1:
            start, end = self._frags[0]
            message = view[start:end]
        else:  # split across records: one copy to make the message contiguous
            message = memoryview(b"".join(view[s:e] for s, e in self._frags))
        if len(message) > need:
            raise _broken(f"{len(message) - need} bytes follow the ClientHello inside its last record")
        return _parse_body(message[HANDSHAKE_HEADER_SIZE:], self._pos)


def _record_type_verdict(value: int, pos: int, first: bool) -> _Verdict:
    if not first:
        return _broken(f"record at offset {pos} has type {value} inside the ClientHello; expected 22")
    if value & 0x80:
        return _Verdict(NotTLS(f"first byte 0x{value:02x} has the high bit set: SSLv2-style hello or not TLS"))
    return _Verdict(NotTLS(f"first byte {bytes([value])!r} is not a TLS handshake record (0x16)"))


def _record_version_verdict(value: int, pos: int, first: bool) -> _Verdict:
    if not first:
        return _broken(f"record at offset {pos} has version major {value}; expected 3")
    return _Verdict(NotTLS(f"0x16 followed by 0x{value:02x}: not a TLS record version (0x03..)"))


class _Cursor:
    """Bounds-checked reader over a memoryview; errors name the field being read."""

    __slots__ = ("view", "pos", "end", "where")

    def __init__(self, view: memoryview, where: str) -> None:
        self.view, self.pos, self.end, self.where = view, 0, len(view), where

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, count: int, what: str) -> memoryview:
        start = self.pos
        end = start + count
        if end > self.end:
            raise self._short(count, what)
        self.pos = end
        return self.view[start:end]

    def uint(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what), "big")

    def vector(self, width: int, what: str) -> memoryview:
        """A field prefixed by its length in ``width`` (1 or 2) bytes."""
        pos, view = self.pos, self.view
        if pos + width > self.end:
            raise self._short(width, f"{what} length")  # formatted only on error
        self.pos = pos + width
        return self.take(view[pos] if width == 1 else view[pos] << 8 | view[pos + 1], what)

    def _short(self, count: int, what: str) -> _Verdict:
        return _broken(f"{self.where}: {what} needs {count} bytes but only {self.remaining} remain")

    def expect_end(self) -> None:
        if self.pos != self.end:
            raise _broken(f"{self.where}: {self.remaining} unexpected trailing bytes")


def _parse_body(body: memoryview, size: int) -> ClientHello:
    cur = _Cursor(body, "ClientHello")
    legacy_version = cur.uint(2, "legacy_version")
    cur.take(32, "random")
    if len(cur.vector(1, "legacy_session_id")) > MAX_SESSION_ID:
        raise _broken(f"ClientHello: legacy_session_id longer than {MAX_SESSION_ID} bytes")
    suites = _cipher_suites(cur.vector(2, "cipher_suites"))
    if not cur.vector(1, "legacy_compression_methods"):
        raise _broken("ClientHello: legacy_compression_methods is empty")
    wanted = _extensions(cur) if cur.remaining else {}
    return ClientHello(
        sni=_server_name(wanted[EXT_SERVER_NAME]) if EXT_SERVER_NAME in wanted else None,
        alpn=_alpn(wanted[EXT_ALPN]) if EXT_ALPN in wanted else (),
        versions=_supported_versions(wanted.get(EXT_SUPPORTED_VERSIONS), legacy_version),
        legacy_version=legacy_version,
        cipher_suites=suites,
        size=size,
    )


def _cipher_suites(raw: memoryview) -> tuple[int, ...]:
    if not raw or len(raw) % 2:
        raise _broken(f"ClientHello: cipher_suites length {len(raw)} must be even and non-zero")
    return struct.unpack(f">{len(raw) // 2}H", raw)


def _extensions(cur: _Cursor) -> dict[int, memoryview]:
    """Walk the extensions block; keep the ones we read, reject duplicates."""
    block = cur.vector(2, "extensions")
    cur.expect_end()
    pos, end = 0, len(block)
    seen: set[int] = set()
    wanted: dict[int, memoryview] = {}
    while pos < end:  # the hottest loop: one struct call per extension, no cursor
        if end - pos < 4:
            raise _broken(f"extensions: extension header needs 4 bytes but only {end - pos} remain")
        ext_type, length = _EXT_HEADER.unpack_from(block, pos)
        pos += 4
        if length > end - pos:
            raise _broken(f"extensions: extension {ext_type} needs {length} bytes but only {end - pos} remain")
        if ext_type in seen:
            raise _broken(f"extensions: duplicate extension type {ext_type}")
        seen.add(ext_type)
        if ext_type in _WANTED_EXTENSIONS:
            wanted[ext_type] = block[pos : pos + length]
        pos += length
    return wanted


def _server_name(data: memoryview) -> str | None:
    outer = _Cursor(data, "server_name")
    entries = _Cursor(outer.vector(2, "server_name_list"), "server_name")
    outer.expect_end()
    if not entries.remaining:
        raise _broken("server_name: the name list is empty")
    host = None
    while entries.remaining:
        name_type = entries.uint(1, "name_type")
        name = entries.vector(2, "host_name")
        if name_type != SNI_HOST_NAME:
            continue  # unknown name types are ignored, as RFC 6066 servers do
        if host is not None:
            raise _broken("server_name: more than one host_name")
        host = name
    return None if host is None else _normalize_host(host.tobytes())


def _normalize_host(raw: bytes) -> str:
    if not raw:
        raise _broken("server_name: host_name is empty")
    if len(raw) > MAX_HOST_NAME:
        raise _broken(f"server_name: host_name is {len(raw)} bytes, over {MAX_HOST_NAME}")
    bad = raw.translate(None, _HOST_BYTES)
    if bad:
        raise _broken(f"server_name: host_name {raw[:80]!r} contains {bad[:1]!r}, not a host character")
    host = raw[:-1] if raw.endswith(b".") else raw
    if not host or host.startswith(b".") or host.endswith(b".") or b".." in host:
        raise _broken(f"server_name: host_name {raw[:80]!r} has an empty label")
    if _LONG_LABEL.search(host):
        raise _broken(f"server_name: host_name {raw[:80]!r} has a label over 63 bytes")
    return host.lower().decode("ascii")


def _alpn(data: memoryview) -> tuple[str, ...]:
    outer = _Cursor(data, "ALPN")
    names = _Cursor(outer.vector(2, "protocol_name_list"), "ALPN")
    outer.expect_end()
    if not names.remaining:
        raise _broken("ALPN: the protocol list is empty")
    protocols = []
    while names.remaining:
        name = names.vector(1, "protocol name")
        if not name:
            raise _broken("ALPN: empty protocol name")
        protocols.append(str(name, "latin-1"))
    return tuple(protocols)


def _supported_versions(data: memoryview | None, legacy_version: int) -> tuple[int, ...]:
    if data is None:
        return (legacy_version,)
    outer = _Cursor(data, "supported_versions")
    raw = outer.vector(1, "versions")
    outer.expect_end()
    if not raw or len(raw) % 2:
        raise _broken(f"supported_versions: list length {len(raw)} must be even and non-zero")
    return struct.unpack(f">{len(raw) // 2}H", raw)
