"""PROXY protocol headers (`send-proxy v1|v2` backends) sent by a real `python -m dynproxy`,
read back by a parser written here from HAProxy's proxy-protocol.txt, independently of
dynproxy.core.proxyproto: the bytes must carry the real client address and port and the
address the client connected to, then exactly the client's bytes.
"""

from __future__ import annotations

import ipaddress
import queue
import socket
from dataclasses import dataclass
from types import SimpleNamespace

import pytest

V2_SIGNATURE = bytes([0x0D, 0x0A, 0x0D, 0x0A, 0x00, 0x0D, 0x0A, 0x51, 0x55, 0x49, 0x54, 0x0A])


@dataclass(frozen=True)
class Header:
    version: int
    family: str  # "TCP4" or "TCP6"
    src: tuple[str, int]
    dst: tuple[str, int]
    size: int  # bytes the header took


def parse_v1(data: bytes) -> Header:
    """Section 2.1: "PROXY" SP ("TCP4"|"TCP6") SP src SP dst SP sport SP dport CRLF,
    at most 107 bytes, single spaces, decimal ports without leading zeros."""
    end = data.find(b"\r\n")
    assert 0 < end <= 105, f"no CRLF within 107 bytes: {data[:120]!r}"
    line = data[:end].decode("ascii")
    fields = line.split(" ")
    assert len(fields) == 6 and fields[0] == "PROXY", line
    _, family, src, dst, sport, dport = fields
    version = {"TCP4": 4, "TCP6": 6}[family]
    for address in (src, dst):
        assert ipaddress.ip_address(address).version == version, line
        assert str(ipaddress.ip_address(address)) == address, f"not canonical: {line}"
    for port in (sport, dport):
        assert port.isdigit() and str(int(port)) == port and int(port) <= 65535, line
    return Header(1, family, (src, int(sport)), (dst, int(dport)), end + 2)


def parse_v2(data: bytes) -> Header:
    """Section 2.2: 12-byte signature, version 2 / command PROXY (0x21), family and
    transport (0x11 TCP over IPv4, 0x21 TCP over IPv6), 16-bit length of what follows,
    the addresses, then optional TLVs (type, 16-bit length, value)."""
    assert data[:12] == V2_SIGNATURE, data[:16]
    assert data[12] == 0x21, f"version/command byte 0x{data[12]:02x}, expected 0x21"
    family, length = data[13], int.from_bytes(data[14:16], "big")
    body = data[16:16 + length]
    assert len(body) == length
    if family == 0x11:
        size, name, width = 12, "TCP4", 4
    else:
        assert family == 0x21, f"family byte 0x{family:02x}"
        size, name, width = 36, "TCP6", 16
    assert length >= size
    src = str(ipaddress.ip_address(body[:width]))
    dst = str(ipaddress.ip_address(body[width:2 * width]))
    sport = int.from_bytes(body[2 * width:2 * width + 2], "big")
    dport = int.from_bytes(body[2 * width + 2:2 * width + 4], "big")
    tlvs = body[size:]
    while tlvs:  # whatever TLVs follow must be well formed
        assert len(tlvs) >= 3
        tlv_len = int.from_bytes(tlvs[1:3], "big")
        assert len(tlvs) >= 3 + tlv_len
        tlvs = tlvs[3 + tlv_len:]
    return Header(2, name, (src, sport), (dst, dport), 16 + length)


# ---------------------------------------------------------------- one proxy for the module

@pytest.fixture(scope="module")
def site(testkit, tmp_path_factory):
    k = testkit
    received: queue.Queue = queue.Queue()

    def record(conn):
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
        received.put(data)
        conn.sendall(b"ok\n")

    pp1, pp2 = k.ScriptedBackend(record), k.ScriptedBackend(record)
    ports = {"v2": k.free_port(), "six_v1": k.free_port(host="::1"),
             "six_v2": k.free_port(host="::1")}
    p = k.Proxy(tmp_path_factory.mktemp("proxyproto"), f"""
backend pp1 {pp1.address} send-proxy v1
backend pp2 {pp2.address} send-proxy v2
rule tls: sni exact "pp.example.com" -> forward(pp2)
rule v2: dport {ports["v2"]} -> forward(pp2)
rule six_v1: dport {ports["six_v1"]} -> forward(pp1)
rule six_v2: dport {ports["six_v2"]} -> forward(pp2)
default -> forward(pp1)
""", udp=False, config=k.fast_config(), extra_args=(
        "--tcp-bind", f"127.0.0.1:{ports['v2']}", "--tcp-bind", f"[::1]:{ports['six_v1']}",
        "--tcp-bind", f"[::1]:{ports['six_v2']}"))
    ports["v1"] = p.tcp_port
    yield SimpleNamespace(proxy=p, ports=ports, received=received,
                          line_of=lambda client: k.access_line_of(p, client))
    p.stop()
    pp1.stop()
    pp2.stop()


def send_through(site, port: int, payload: bytes, host="127.0.0.1", source=None):
    """Send `payload`, half-close; return (client address, proxy address, what the
    backend received)."""
    with socket.create_connection((host, port), timeout=5,
                                  source_address=(source, 0) if source else None) as sock:
        client, server = sock.getsockname()[:2], sock.getpeername()[:2]
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        assert sock.recv(10) == b"ok\n"
    return client, server, site.received.get(timeout=5)


PAYLOAD = b"GET / HTTP/1.0\r\n\r\n" + bytes(range(256))


@pytest.mark.parametrize("listener, host, source, version, family", [
    ("v1", "127.0.0.1", "127.0.0.7", 1, "TCP4"),
    ("v2", "127.0.0.1", "127.0.0.7", 2, "TCP4"),
    ("six_v1", "::1", None, 1, "TCP6"),
    ("six_v2", "::1", None, 2, "TCP6"),
])
def test_proxy_header_carries_the_real_client_then_its_bytes(site, listener, host, source,
                                                             version, family):
    client, server, got = send_through(site, site.ports[listener], PAYLOAD, host, source)
    header = (parse_v1 if version == 1 else parse_v2)(got)
    assert (header.version, header.family) == (version, family)
    assert header.src == client  # the real client, not the proxy's own address
    assert header.dst == server  # the address the client connected to
    assert got[header.size:] == PAYLOAD
    line = site.line_of((client, server))
    assert (line["bytes_up"], line["end"]) == (len(PAYLOAD), "closed")  # header not counted


def test_v2_header_precedes_the_peeked_client_hello_byte_exact(site, client_hello):
    hello = client_hello("pp.example.com", ("h2",), key_share=1216, record_sizes=(200,))
    client, server, got = send_through(site, site.ports["v1"], hello + PAYLOAD,
                                       source="127.0.0.9")
    header = parse_v2(got)
    assert (header.src, header.dst) == (client, server)
    assert header.size == 28  # no TLVs: 16 + 12
    assert got[header.size:] == hello + PAYLOAD
    assert site.line_of((client, server))["sni"] == "pp.example.com"


def test_the_independent_parsers_reject_what_the_spec_forbids():
    """The parsers above are the oracle: make sure they can fail."""
    good_v1 = b"PROXY TCP4 127.0.0.1 127.0.0.2 5000 443\r\n"
    assert parse_v1(good_v1).src == ("127.0.0.1", 5000)
    for bad in (b"PROXY TCP4 127.0.0.1  127.0.0.2 5000 443\r\n",  # double space
                b"PROXY TCP4 127.0.0.1 127.0.0.2 05000 443\r\n",  # leading zero
                b"PROXY TCP6 127.0.0.1 127.0.0.2 5000 443\r\n",  # family mismatch
                b"PROXY TCP4 127.0.0.1 127.0.0.2 5000 443\n"):  # no CR
        with pytest.raises((AssertionError, KeyError)):
            parse_v1(bad)
    good_v2 = V2_SIGNATURE + bytes([0x21, 0x11, 0, 12, 127, 0, 0, 1, 127, 0, 0, 2, 0x13, 0x88,
                                    1, 0xBB])
    assert parse_v2(good_v2) == Header(2, "TCP4", ("127.0.0.1", 5000), ("127.0.0.2", 443), 28)
    for bad in (good_v2[:12] + b"\x20" + good_v2[13:],  # LOCAL command
                good_v2[:13] + b"\x12" + good_v2[14:],  # UDP
                good_v2[:15] + b"\x0b" + good_v2[16:]):  # length too short for IPv4
        with pytest.raises(AssertionError):
            parse_v2(bad)
