"""PROXY protocol encoder, checked against a parser written here from the spec.

The parsers below follow haproxy's doc/proxy-protocol.txt (sections 2.1 and 2.2) and
use only struct and socket.inet_ntop, never the encoder's own helpers, so a mistake
in the encoder cannot be mirrored by the check.
"""

import ipaddress
import re
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dynproxy.core.proxyproto import (
    PP2_TYPE_ALPN,
    PP2_TYPE_AUTHORITY,
    encode_v1,
    encode_v2,
)

# --- an independent parser, from the spec -------------------------------------------

SPEC_SIGNATURE = b"\x0D\x0A\x0D\x0A\x00\x0D\x0A\x51\x55\x49\x54\x0A"
V1_LINE = re.compile(
    rb"PROXY (?:(TCP4|TCP6) ([0-9a-fA-F:.]+) ([0-9a-fA-F:.]+) (0|[1-9][0-9]{0,4}) "
    rb"(0|[1-9][0-9]{0,4})|UNKNOWN)\r\n\Z"
)


def parse_v1(line: bytes):
    assert len(line) <= 107, "spec 2.1: a v1 line is at most 107 bytes"
    m = V1_LINE.match(line)
    assert m, f"not a v1 line: {line!r}"
    proto, src, dst, sport, dport = m.groups()
    if proto is None:
        return ("UNKNOWN",)
    family = socket.AF_INET if proto == b"TCP4" else socket.AF_INET6
    for text in (src, dst):  # must be valid for the announced family
        socket.inet_pton(family, text.decode())
    assert 0 <= int(sport) <= 65535 and 0 <= int(dport) <= 65535
    return proto.decode(), src.decode(), dst.decode(), int(sport), int(dport)


def parse_v2(data: bytes) -> dict:
    assert data[:12] == SPEC_SIGNATURE
    ver_cmd, fam, length = struct.unpack("!BBH", data[12:16])
    assert ver_cmd >> 4 == 2, "high nibble of byte 13 is the version, 2"
    assert ver_cmd & 0xF in (0, 1), "command is LOCAL (0) or PROXY (1)"
    assert fam in (0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32), f"invalid family byte {fam:#x}"
    assert len(data) == 16 + length, "length counts every byte after the 16-byte header"
    payload = data[16:]
    out = {"command": "LOCAL" if ver_cmd & 0xF == 0 else "PROXY", "fam": fam}
    if fam >> 4 == 1:
        src, dst, sport, dport = struct.unpack("!4s4sHH", payload[:12])
        out["addrs"] = (socket.inet_ntop(socket.AF_INET, src),
                        socket.inet_ntop(socket.AF_INET, dst), sport, dport)
        payload = payload[12:]
    elif fam >> 4 == 2:
        src, dst, sport, dport = struct.unpack("!16s16sHH", payload[:36])
        out["addrs"] = (socket.inet_ntop(socket.AF_INET6, src),
                        socket.inet_ntop(socket.AF_INET6, dst), sport, dport)
        payload = payload[36:]
    out["tlvs"] = parse_tlvs(payload)
    return out


def parse_tlvs(payload: bytes) -> list:
    tlvs = []
    while payload:
        assert len(payload) >= 3, "a TLV needs type and two length bytes"
        kind, length = struct.unpack("!BH", payload[:3])
        value = payload[3:3 + length]
        assert len(value) == length, "TLV length runs past the end"
        tlvs.append((kind, value))
        payload = payload[3 + length:]
    return tlvs


# --- known-good bytes, written out by hand -------------------------------------------

def test_v1_tcp4_spec_example():
    line = encode_v1(("192.168.0.1", 56324), ("192.168.0.11", 443))
    assert line == b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n"


def test_v1_tcp6_literal():
    line = encode_v1(("2001:db8::1", 1, 0, 0), ("2001:db8::2", 65535, 0, 0))
    assert line == b"PROXY TCP6 2001:db8::1 2001:db8::2 1 65535\r\n"


def test_v2_tcp4_literal():
    header = encode_v2(("127.0.0.1", 12345), ("10.0.0.2", 80))
    assert header == (
        b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x11\x00\x0c"
        + b"\x7f\x00\x00\x01" + b"\x0a\x00\x00\x02" + b"\x30\x39" + b"\x00\x50"
    )


def test_v2_udp6_literal():
    header = encode_v2(("::1", 53, 0, 0), ("2001:db8::5", 5353, 0, 0), proto="udp")
    assert header == (
        b"\r\n\r\n\x00\r\nQUIT\n" + b"\x21\x22\x00\x24"
        + b"\x00" * 15 + b"\x01"
        + b"\x20\x01\x0d\xb8" + b"\x00" * 11 + b"\x05"
        + b"\x00\x35" + b"\x14\xe9"
    )


def test_v2_local_literal_ignores_addresses():
    expected = b"\r\n\r\n\x00\r\nQUIT\n\x20\x00\x00\x00"
    assert encode_v2(("127.0.0.1", 1), ("127.0.0.1", 2), local=True) == expected
    assert encode_v2(None, None, local=True) == expected


def test_v2_tlv_literal():
    header = encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), tlvs=((PP2_TYPE_AUTHORITY, b"a.io"),))
    assert header == (
        b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x13"
        + bytes([1, 2, 3, 4, 5, 6, 7, 8, 0, 1, 0, 2]) + b"\x02\x00\x04a.io"
    )


# --- address family rules ------------------------------------------------------------

def test_v1_both_mapped_are_unwrapped_to_tcp4():
    line = encode_v1(("::ffff:10.1.2.3", 4000, 0, 0), ("::ffff:10.0.0.1", 443, 0, 0))
    assert parse_v1(line) == ("TCP4", "10.1.2.3", "10.0.0.1", 4000, 443)


def test_v1_mapped_and_plain_ipv4_are_tcp4():
    line = encode_v1(("::ffff:10.1.2.3", 4000, 0, 0), ("10.0.0.1", 443))
    assert parse_v1(line) == ("TCP4", "10.1.2.3", "10.0.0.1", 4000, 443)


def test_v1_mixed_families_map_the_ipv4_end():
    line = encode_v1(("10.1.2.3", 4000), ("2001:db8::1", 443, 0, 0))
    assert parse_v1(line) == ("TCP6", "::ffff:10.1.2.3", "2001:db8::1", 4000, 443)
    line = encode_v1(("2001:db8::1", 443, 0, 0), ("::ffff:10.1.2.3", 80, 0, 0))
    assert parse_v1(line) == ("TCP6", "2001:db8::1", "::ffff:10.1.2.3", 443, 80)


def test_v2_mixed_families_map_the_ipv4_end():
    parsed = parse_v2(encode_v2(("10.1.2.3", 4000), ("2001:db8::1", 443, 0, 0)))
    assert parsed["fam"] == 0x21
    assert parsed["addrs"] == ("::ffff:10.1.2.3", "2001:db8::1", 4000, 443)


def test_v2_both_mapped_are_unwrapped_to_inet():
    parsed = parse_v2(encode_v2(("::ffff:1.2.3.4", 1, 0, 0), ("::ffff:5.6.7.8", 2, 0, 0),
                                proto="udp"))
    assert parsed["fam"] == 0x12
    assert parsed["addrs"] == ("1.2.3.4", "5.6.7.8", 1, 2)


def test_zone_id_is_dropped():
    line = encode_v1(("fe80::1%eth0", 5, 0, 2), ("fe80::2%eth0", 6, 0, 2))
    assert line == b"PROXY TCP6 fe80::1 fe80::2 5 6\r\n"
    parsed = parse_v2(encode_v2(("fe80::1%eth0", 5, 0, 2), ("::1", 6, 0, 0)))
    assert parsed["addrs"] == ("fe80::1", "::1", 5, 6)


@pytest.mark.parametrize(
    "src, dst",
    [
        (None, ("127.0.0.1", 80)),
        (("127.0.0.1", 80), None),
        ("/run/dynproxy.sock", "/run/other.sock"),  # Unix sockets report paths
        (("localhost", 1), ("127.0.0.1", 80)),  # a name, not an IP literal
        (("", 0), ("127.0.0.1", 80)),
    ],
)
def test_unexpressible_endpoints(src, dst):
    assert encode_v1(src, dst) == b"PROXY UNKNOWN\r\n"
    assert parse_v1(encode_v1(src, dst)) == ("UNKNOWN",)
    header = encode_v2(src, dst)
    assert header == b"\r\n\r\n\x00\r\nQUIT\n\x21\x00\x00\x00"
    parsed = parse_v2(header)
    assert parsed["command"] == "PROXY" and "addrs" not in parsed


def test_v2_unspec_still_carries_tlvs():
    parsed = parse_v2(encode_v2(None, None, tlvs=((PP2_TYPE_ALPN, b"h2"),)))
    assert parsed["fam"] == 0x00
    assert parsed["tlvs"] == [(PP2_TYPE_ALPN, b"h2")]


def test_v1_longest_line_fits_the_spec_limit():
    full = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = encode_v1((full, 65535, 0, 0), (full, 65535, 0, 0))
    assert parse_v1(line) == ("TCP6", full, full, 65535, 65535)


def test_v2_tlvs_keep_order_and_bytes():
    tlvs = ((PP2_TYPE_AUTHORITY, b"api.example.com"), (0xE0, b""), (PP2_TYPE_ALPN, b"h2"),
            (0xEE, bytearray(b"\x00" * 300)))
    parsed = parse_v2(encode_v2(("1.1.1.1", 1), ("2.2.2.2", 2), tlvs=tlvs))
    assert parsed["tlvs"] == [(k, bytes(v)) for k, v in tlvs]


# --- errors ----------------------------------------------------------------------------

@pytest.mark.parametrize("port", [-1, 65536, "80", None, True, 1.0])
def test_bad_port_is_an_error_naming_the_value(port):
    with pytest.raises(ValueError, match=re.escape(repr(port))):
        encode_v1(("127.0.0.1", port), ("127.0.0.1", 80))
    with pytest.raises(ValueError, match="destination port"):
        encode_v2(("127.0.0.1", 80), ("127.0.0.1", port))


def test_bad_proto_is_an_error():
    with pytest.raises(ValueError, match="'sctp'"):
        encode_v2(("127.0.0.1", 1), ("127.0.0.1", 2), proto="sctp")


@pytest.mark.parametrize(
    "tlvs, fragment",
    [
        (((256, b""),), "256"),
        (((-1, b""),), "-1"),
        ((("a", b""),), "'a'"),
        (((1, "h2"),), "'h2'"),
        (((1, b"x" * 65536),), "65536"),
        (((1, b"x" * 40000), (2, b"y" * 40000)), "65535"),
    ],
)
def test_bad_tlvs_are_errors(tlvs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        encode_v2(("127.0.0.1", 1), ("127.0.0.1", 2), tlvs=tlvs)


# --- properties over random addresses --------------------------------------------------

def _host_strategy():
    v4 = st.ip_addresses(v=4).map(str)
    v6 = st.ip_addresses(v=6).map(str)
    mapped = st.ip_addresses(v=4).map(lambda a: f"::ffff:{a}")
    return st.one_of(v4, v6, mapped)


def _as_v4(text: str):
    ip = ipaddress.ip_address(text)
    return ip if ip.version == 4 else ip.ipv4_mapped


def _expected_pair(src: str, dst: str):
    """What the spec-level model says the two addresses become."""
    s4, d4 = _as_v4(src), _as_v4(dst)
    if s4 is not None and d4 is not None:
        return 4, str(s4), str(d4)
    s6 = ipaddress.IPv6Address(f"::ffff:{s4}") if s4 else ipaddress.IPv6Address(src)
    d6 = ipaddress.IPv6Address(f"::ffff:{d4}") if d4 else ipaddress.IPv6Address(dst)
    return 6, s6, d6


ports = st.integers(0, 65535)


@given(_host_strategy(), _host_strategy(), ports, ports)
def test_v1_matches_model(src, dst, sport, dport):
    proto, psrc, pdst, psport, pdport = parse_v1(encode_v1((src, sport), (dst, dport)))
    version, esrc, edst = _expected_pair(src, dst)
    assert proto == f"TCP{version}"
    if version == 4:
        assert (psrc, pdst) == (esrc, edst)
    else:
        assert (ipaddress.IPv6Address(psrc), ipaddress.IPv6Address(pdst)) == (esrc, edst)
    assert (psport, pdport) == (sport, dport)


@given(_host_strategy(), _host_strategy(), ports, ports, st.sampled_from(["tcp", "udp"]),
       st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=40)), max_size=4))
def test_v2_matches_model(src, dst, sport, dport, proto, tlvs):
    header = encode_v2((src, sport), (dst, dport), proto=proto, tlvs=tuple(tlvs))
    parsed = parse_v2(header)
    version, esrc, edst = _expected_pair(src, dst)
    family = 1 if version == 4 else 2
    assert parsed["command"] == "PROXY"
    assert parsed["fam"] == family << 4 | (1 if proto == "tcp" else 2)
    psrc, pdst, psport, pdport = parsed["addrs"]
    assert (ipaddress.ip_address(psrc), ipaddress.ip_address(pdst)) == (
        ipaddress.ip_address(esrc), ipaddress.ip_address(edst))
    assert (psport, pdport) == (sport, dport)
    assert parsed["tlvs"] == tlvs
