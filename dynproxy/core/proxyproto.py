"""PROXY protocol header encoder (HAProxy proxy-protocol.txt, versions 1 and 2).

Turns the client and local endpoints of a proxied connection into the header bytes
written to the upstream before anything else, so the backend learns who the client
really was. Byte-exact to the spec; the net layer only writes what this returns.

Must never do I/O or import socket/gevent: addresses arrive as the plain tuples that
``getpeername()``/``getsockname()`` return and leave as bytes.

Address rules (both versions):
  * an IPv4-mapped IPv6 address (``::ffff:1.2.3.4``, what a dual-stack listener
    reports for IPv4 clients) is sent as IPv4 when the other end is IPv4 too;
  * otherwise mixed families are sent as IPv6, the IPv4 end mapped to ``::ffff:a.b.c.d``;
  * an endpoint that is ``None`` or whose host is not an IP literal (for example a
    Unix socket) cannot be expressed: v1 sends ``PROXY UNKNOWN``, v2 sends the
    UNSPEC family with no addresses (the receiver then uses the real endpoints).
  * IPv6 zone ids (``fe80::1%eth0``) are dropped: the header has no room for them.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "V2_SIGNATURE",
    "PP2_TYPE_ALPN",
    "PP2_TYPE_AUTHORITY",
    "PP2_TYPE_CRC32C",
    "PP2_TYPE_NOOP",
    "PP2_TYPE_UNIQUE_ID",
    "PP2_TYPE_SSL",
    "PP2_TYPE_NETNS",
    "V1_UNKNOWN",
    "encode_v1",
    "encode_v2",
]

Address = tuple  # (host, port) or (host, port, flowinfo, scope_id), as sockets return

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_UNKNOWN = b"PROXY UNKNOWN\r\n"

# TLV types from section 2.2 of the spec, for callers building ``tlvs``.
PP2_TYPE_ALPN = 0x01
PP2_TYPE_AUTHORITY = 0x02  # the SNI host name, as HAProxy sends it
PP2_TYPE_CRC32C = 0x03
PP2_TYPE_NOOP = 0x04
PP2_TYPE_UNIQUE_ID = 0x05
PP2_TYPE_SSL = 0x20
PP2_TYPE_NETNS = 0x30

_V2_LOCAL = 0x20  # version 2, command LOCAL
_V2_PROXY = 0x21  # version 2, command PROXY
_FAM_UNSPEC = 0x00
_FAM_INET = {"tcp": 0x11, "udp": 0x12}  # AF_INET << 4 | STREAM / DGRAM
_FAM_INET6 = {"tcp": 0x21, "udp": 0x22}  # AF_INET6 << 4 | STREAM / DGRAM

_HEADER = struct.Struct("!12sBBH")
_ADDR4 = struct.Struct("!4s4sHH")
_ADDR6 = struct.Struct("!16s16sHH")
_TLV = struct.Struct("!BH")
_MAX_LEN = 0xFFFF


@dataclass(frozen=True, slots=True)
class _Host:
    """Every form of one host address the encoders may need, computed once per host."""

    v4_text: str | None  # None when the address cannot be IPv4
    v4_packed: bytes | None
    v6_text: str  # the address as IPv6; IPv4 hosts are mapped to ::ffff:a.b.c.d
    v6_packed: bytes


@lru_cache(maxsize=8192)
def _host(text: str) -> _Host | None:
    """Parse a host literal, or None if it is not an IP address. Cached: clients repeat."""
    try:
        ip = ipaddress.ip_address(text.partition("%")[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        v4 = ip.ipv4_mapped
        if v4 is None:
            return _Host(None, None, str(ip), ip.packed)
        ip = v4
    mapped = ipaddress.IPv6Address(b"\0" * 10 + b"\xff\xff" + ip.packed)
    return _Host(str(ip), ip.packed, f"::ffff:{ip}", mapped.packed)


def _endpoint(addr: Address | None, which: str) -> tuple[_Host, int] | None:
    # Unix sockets report a path string, not a tuple: not expressible, like None.
    if not isinstance(addr, tuple) or len(addr) < 2 or not isinstance(addr[0], str):
        return None
    host = _host(addr[0])
    if host is None:
        return None
    port = addr[1]
    if type(port) is not int or not 0 <= port <= 0xFFFF:
        raise ValueError(f"PROXY header {which} port must be an int in 0..65535, got {port!r}")
    return host, port


def _endpoints(src: Address | None, dst: Address | None):
    """Both endpoints parsed, or None if either cannot be expressed."""
    s = _endpoint(src, "source")
    d = _endpoint(dst, "destination")
    if s is None or d is None:
        return None
    return s, d


def encode_v1(src: Address | None, dst: Address | None) -> bytes:
    """The human-readable v1 line: ``PROXY TCP4|TCP6 src dst sport dport\\r\\n``.

    v1 knows only TCP. Returns ``PROXY UNKNOWN\\r\\n`` when an endpoint is not IP.
    """
    ends = _endpoints(src, dst)
    if ends is None:
        return V1_UNKNOWN
    (s, sport), (d, dport) = ends
    if s.v4_text is not None and d.v4_text is not None:
        return f"PROXY TCP4 {s.v4_text} {d.v4_text} {sport} {dport}\r\n".encode("ascii")
    return f"PROXY TCP6 {s.v6_text} {d.v6_text} {sport} {dport}\r\n".encode("ascii")


def encode_v2(
    src: Address | None,
    dst: Address | None,
    *,
    proto: str = "tcp",
    local: bool = False,
    tlvs: tuple[tuple[int, bytes], ...] = (),
) -> bytes:
    """The binary v2 header: signature, version/command, family/transport, length,
    addresses, then ``tlvs`` as (type, value) pairs in the order given.

    ``local=True`` sends the LOCAL command (the proxy's own connection, e.g. a health
    check) with the UNSPEC family and no addresses; ``src``/``dst`` are then ignored.
    """
    if proto not in _FAM_INET:
        raise ValueError(f"PROXY v2 proto must be 'tcp' or 'udp', got {proto!r}")
    ends = None if local else _endpoints(src, dst)
    if ends is None:
        family, body = _FAM_UNSPEC, b""
    else:
        family, body = _v2_addresses(ends, proto)
    if tlvs:
        body += _encode_tlvs(tlvs)
    if len(body) > _MAX_LEN:
        raise ValueError(f"PROXY v2 addresses and TLVs take {len(body)} bytes; the limit is 65535")
    command = _V2_LOCAL if local else _V2_PROXY
    return _HEADER.pack(V2_SIGNATURE, command, family, len(body)) + body


def _v2_addresses(ends, proto: str) -> tuple[int, bytes]:
    (s, sport), (d, dport) = ends
    if s.v4_packed is not None and d.v4_packed is not None:
        return _FAM_INET[proto], _ADDR4.pack(s.v4_packed, d.v4_packed, sport, dport)
    return _FAM_INET6[proto], _ADDR6.pack(s.v6_packed, d.v6_packed, sport, dport)


def _encode_tlvs(tlvs: tuple[tuple[int, bytes], ...]) -> bytes:
    parts = []
    for kind, value in tlvs:
        if type(kind) is not int or not 0 <= kind <= 0xFF:
            raise ValueError(f"PROXY v2 TLV type must be an int in 0..255, got {kind!r}")
        if not isinstance(value, (bytes, bytearray)):
            raise ValueError(f"PROXY v2 TLV {kind:#04x} value must be bytes, got {value!r}")
        if len(value) > _MAX_LEN:
            raise ValueError(f"PROXY v2 TLV {kind:#04x} value is {len(value)} bytes; max 65535")
        parts.append(_TLV.pack(kind, len(value)))
        parts.append(bytes(value))
    return b"".join(parts)
