"""Byte-level tests for dynproxy.core.clienthello: hand-built hellos, splits, every
Malformed reason, real captured hellos, and hypothesis fuzzing."""

from __future__ import annotations

import ast
import json
import pickle
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from dynproxy.core import clienthello
from dynproxy.core.clienthello import (
    NEED_MORE,
    ClientHello,
    ClientHelloParser,
    Malformed,
    NeedMore,
    NotTLS,
)

CORPUS = Path(__file__).parent / "clienthello_corpus"

# ---------------------------------------------------------------- builder


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ext(ext_type: int, data: bytes) -> bytes:
    return u16(ext_type) + u16(len(data)) + data


def sni_ext(*names: bytes, name_type: int = 0) -> bytes:
    entries = b"".join(u8(name_type) + u16(len(n)) + n for n in names)
    return ext(0, u16(len(entries)) + entries)


def alpn_ext(*protocols: bytes) -> bytes:
    names = b"".join(u8(len(p)) + p for p in protocols)
    return ext(16, u16(len(names)) + names)


def versions_ext(*versions: int) -> bytes:
    return ext(43, u8(2 * len(versions)) + b"".join(map(u16, versions)))


def key_share_ext(size: int) -> bytes:
    """A key_share with one big entry, like X25519MLKEM768 (1216 bytes) makes."""
    entry = u16(0x11EC) + u16(size) + bytes(range(256)) * (size // 256) + bytes(size % 256)
    return ext(51, u16(len(entry)) + entry)


def body(
    extensions: bytes | None = b"",
    *,
    legacy_version: int = 0x0303,
    session_id: bytes = bytes(32),
    suites: tuple[int, ...] = (0x1301, 0x1302, 0xC02F),
    compression: bytes = b"\x00",
) -> bytes:
    head = u16(legacy_version) + bytes(range(32)) + u8(len(session_id)) + session_id
    head += u16(2 * len(suites)) + b"".join(map(u16, suites)) + u8(len(compression)) + compression
    return head if extensions is None else head + u16(len(extensions)) + extensions


def handshake(hello_body: bytes, msg_type: int = 1) -> bytes:
    return u8(msg_type) + len(hello_body).to_bytes(3, "big") + hello_body


def records(message: bytes, sizes: list[int] | None = None, version: int = 0x0301) -> bytes:
    """Wrap a handshake message in type-22 records of the given payload sizes."""
    out, pos = b"", 0
    for size in sizes or []:
        fragment = message[pos : pos + size]
        out += u8(22) + u16(version) + u16(len(fragment)) + fragment
        pos += len(fragment)
    if pos < len(message):
        out += u8(22) + u16(version) + u16(len(message) - pos) + message[pos:]
    return out


def stream(extensions: bytes | None = b"", sizes: list[int] | None = None, **kw) -> bytes:
    return records(handshake(body(extensions, **kw)), sizes)


TYPICAL = sni_ext(b"www.example.com") + alpn_ext(b"h2", b"http/1.1") + versions_ext(0x0304, 0x0303)
BIG_PQ = TYPICAL + key_share_ext(1216) + ext(21, bytes(400))  # ~1.8 KB, as PQ clients send


def parse(data: bytes, max_size: int = 65536):
    return ClientHelloParser(max_size).feed(data)


def feed_in_pieces(data: bytes, cuts, max_size: int = 65536):
    """Feed ``data`` cut at the given offsets; return the first final answer."""
    parser, last = ClientHelloParser(max_size), 0
    result = NEED_MORE
    for cut in [*sorted(set(cuts)), len(data)]:
        result = parser.feed(data[last:cut])
        last = cut
        if result is not NEED_MORE:
            break
    return result


def feed_bytewise(data: bytes, max_size: int = 65536):
    return feed_in_pieces(data, range(1, len(data)), max_size)


# ---------------------------------------------------------------- valid hellos


def test_typical_hello_fields():
    data = stream(TYPICAL)
    assert parse(data) == ClientHello(
        sni="www.example.com",
        alpn=("h2", "http/1.1"),
        versions=(0x0304, 0x0303),
        legacy_version=0x0303,
        cipher_suites=(0x1301, 0x1302, 0xC02F),
        size=len(data),
    )


def test_hello_without_extensions_block():
    result = parse(stream(None, legacy_version=0x0301))
    assert (result.sni, result.alpn, result.versions, result.legacy_version) == (None, (), (0x0301,), 0x0301)


def test_empty_extensions_block_and_other_extensions_only():
    assert parse(stream(b"")).sni is None
    result = parse(stream(ext(10, u16(2) + u16(29)) + ext(13, b"")))
    assert (result.sni, result.alpn, result.versions) == (None, (), (0x0303,))


@pytest.mark.parametrize(
    "raw, expected",
    [
        (b"WWW.Example.COM", "www.example.com"),
        (b"www.example.com.", "www.example.com"),
        (b"xn--bcher-kva.example", "xn--bcher-kva.example"),
        (b"_acme-challenge.example.com", "_acme-challenge.example.com"),
        (b"localhost", "localhost"),
        (b"a" * 63 + b"." + b"b" * 63, "a" * 63 + "." + "b" * 63),
        (b"a." * 127 + b"b", "a." * 127 + "b"),  # 255 bytes, the largest allowed
    ],
)
def test_sni_is_normalised(raw, expected):
    assert parse(stream(sni_ext(raw))).sni == expected


def test_unknown_sni_name_types_are_ignored():
    entries = u8(7) + u16(3) + b"abc" + u8(0) + u16(5) + b"a.com"
    assert parse(stream(ext(0, u16(len(entries)) + entries))).sni == "a.com"
    assert parse(stream(sni_ext(b"\xff\x00", name_type=9))).sni is None


def test_grease_and_odd_alpn_bytes_are_kept_as_sent():
    result = parse(stream(versions_ext(0x7A7A, 0x0304) + alpn_ext(b"\xe9t\xe9"), suites=(0x0A0A, 0x1301)))
    assert result.versions == (0x7A7A, 0x0304)
    assert result.cipher_suites == (0x0A0A, 0x1301)
    assert result.alpn == ("\xe9t\xe9",)  # latin-1: every byte survives


def test_size_excludes_bytes_after_the_hello_records():
    data = stream(TYPICAL)
    early_data = u8(23) + u16(0x0303) + u16(3) + b"abc"
    assert parse(data + early_data).size == len(data)
    assert feed_bytewise(data + early_data).size == len(data)


def test_one_byte_at_a_time_needs_more_until_the_last_byte():
    data = stream(BIG_PQ, sizes=[700, 1])
    parser = ClientHelloParser()
    answers = [parser.feed(data[i : i + 1]) for i in range(len(data))]
    assert all(a is NEED_MORE for a in answers[:-1])
    assert answers[-1] == parse(data)
    assert answers[-1].sni == "www.example.com"


@pytest.mark.parametrize(
    "sizes",
    [[512, 512, 512], [1, 1, 1, 1], [2, 3], [3, 800], [4], [1000], [1] * 40, [16384]],
    ids=lambda s: "-".join(map(str, s[:4])),
)
def test_big_hello_split_across_records(sizes):
    message = handshake(body(BIG_PQ))
    assert len(message) > 1700
    data = records(message, sizes)
    expected = ClientHello(
        sni="www.example.com",
        alpn=("h2", "http/1.1"),
        versions=(0x0304, 0x0303),
        legacy_version=0x0303,
        cipher_suites=(0x1301, 0x1302, 0xC02F),
        size=len(data),
    )
    assert parse(data) == expected
    assert feed_bytewise(data) == expected
    assert feed_in_pieces(data, range(0, len(data), 1460)) == expected


def test_answer_is_final():
    parser = ClientHelloParser()
    first = parser.feed(stream(TYPICAL))
    assert parser.feed(b"GET / HTTP/1.1\r\n") is first
    plain = ClientHelloParser()
    not_tls = plain.feed(b"G")
    assert plain.feed(stream(TYPICAL)) is not_tls


def test_bytes_beyond_max_size_in_a_later_segment_are_ignored():
    data = stream(sni_ext(b"a.com") + alpn_ext(b"ACME-X", b"H2"))
    parser = ClientHelloParser(max_size=len(data) + 3)
    assert parser.feed(data[:7]) is NEED_MORE
    result = parser.feed(data[7:] + b"Z" * 5000)
    assert result == parse(data) and result.alpn == ("ACME-X", "H2")


def test_module_is_pure():
    tree = ast.parse(Path(clienthello.__file__).read_text())
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "dataclasses", "re", "struct"}


def test_need_more_singleton():
    assert NeedMore() is NEED_MORE
    assert repr(NEED_MORE) == "NEED_MORE"
    assert pickle.loads(pickle.dumps(NEED_MORE)) is NEED_MORE
    assert parse(b"") is NEED_MORE
    assert parse(stream(TYPICAL)[:-1]) is NEED_MORE


@pytest.mark.parametrize("bad", [0, 63, 1.5, "65536", None])
def test_max_size_is_validated(bad):
    with pytest.raises(ValueError, match="max_size"):
        ClientHelloParser(bad)


# ---------------------------------------------------------------- not TLS


@pytest.mark.parametrize(
    "data, decided_after, needle",
    [
        (b"GET / HTTP/1.1\r\n", 1, "b'G'"),
        (b"SSH-2.0-OpenSSH_9.6\r\n", 1, "b'S'"),
        (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 1, "b'P'"),
        (b"\x80\x2e\x01\x03\x01", 1, "SSLv2"),
        (b"\x00\x00", 1, "b'\\x00'"),
        (b"\x16\x02\x00", 2, "0x02"),
        (b"\x16\x16\x03", 2, "0x16"),
    ],
)
def test_not_tls_is_decided_from_the_first_bytes(data, decided_after, needle):
    parser = ClientHelloParser()
    for i in range(decided_after - 1):
        assert parser.feed(data[i : i + 1]) is NEED_MORE
    result = parser.feed(data[decided_after - 1 : decided_after])
    assert isinstance(result, NotTLS)
    assert needle in result.reason
    assert parse(data) == result


def test_any_tls_record_minor_version_is_accepted():
    message = handshake(body(TYPICAL))
    for version in (0x0300, 0x0301, 0x0303, 0x0304, 0x03FF):
        assert parse(records(message, version=version)).sni == "www.example.com"


# ---------------------------------------------------------------- malformed

HEADER = u8(22) + u16(0x0301)
HS = handshake(body(TYPICAL))


def with_hs_len(n: int) -> bytes:
    return HEADER + u16(4 + n) + u8(1) + n.to_bytes(3, "big") + bytes(n)


def sni_list(entries: bytes) -> bytes:
    return ext(0, u16(len(entries)) + entries)


MALFORMED = {
    "record too long": (HEADER + u16(2**14 + 2049), "declares 18433 bytes, over the TLS limit 18432"),
    "empty record": (HEADER + u16(0), "empty handshake record at offset 0"),
    "not a client hello": (records(handshake(body(TYPICAL), msg_type=2)), "handshake message type 2"),
    "hello over max_size": (HEADER + u16(100) + u8(1) + (70000).to_bytes(3, "big"), "declares 70000 bytes"),
    "alert inside hello": (records(HS, [10])[:15] + u8(21) + u16(0x0303) + u16(2), "has type 21 inside"),
    "bad later record version": (records(HS, [10])[:15] + u8(22) + u16(0x0203), "version major 2"),
    "trailing handshake bytes": (HEADER + u16(len(HS) + 1) + HS + b"\x01", "1 bytes follow the ClientHello"),
    "no legacy_version": (with_hs_len(1), "legacy_version needs 2 bytes but only 1 remain"),
    "short random": (with_hs_len(20), "random needs 32 bytes but only 18 remain"),
    "long session id": (stream(session_id=bytes(33)), "legacy_session_id longer than 32"),
    "odd cipher suites": (records(handshake(body(TYPICAL).replace(u16(6) + u16(0x1301), u16(5) + u16(0x1301)))), "cipher_suites length 5"),
    "no cipher suites": (stream(TYPICAL, suites=()), "cipher_suites length 0"),
    "cipher suites overrun": (records(handshake(u16(0x0303) + bytes(33) + u16(4000) + bytes(9))), "cipher_suites needs 4000 bytes but only 9"),
    "no compression": (stream(TYPICAL, compression=b""), "legacy_compression_methods is empty"),
    "lone byte after compression": (records(handshake(body(None) + b"\x00")), "extensions length needs 2 bytes but only 1"),
    "extensions block too long": (records(handshake(body(None) + u16(50) + TYPICAL[:40])), "extensions needs 50 bytes but only 40"),
    "bytes after extensions": (records(handshake(body(TYPICAL) + b"\x00\x00")), "ClientHello: 2 unexpected trailing bytes"),
    "truncated extension": (stream(u16(99) + u16(10) + b"abc"), "extension 99 needs 10 bytes but only 3"),
    "truncated extension header": (stream(TYPICAL + b"\x00"), "extension header needs 4 bytes but only 1 remain"),
    "duplicate extension": (stream(TYPICAL + ext(10, b"") + ext(10, b"")), "duplicate extension type 10"),
    "duplicate sni extension": (stream(sni_ext(b"a.com") + sni_ext(b"b.com")), "duplicate extension type 0"),
    "empty sni extension": (stream(ext(0, b"")), "server_name_list length needs 2 bytes but only 0"),
    "empty sni list": (stream(sni_list(b"")), "server_name: the name list is empty"),
    "sni list overrun": (stream(ext(0, u16(9) + u8(0) + u16(1) + b"a")), "server_name_list needs 9 bytes but only 4"),
    "sni trailing bytes": (stream(ext(0, u16(4) + u8(0) + u16(1) + b"a" + b"zz")), "server_name: 2 unexpected trailing bytes"),
    "sni name overrun": (stream(sni_list(u8(0) + u16(8) + b"abc")), "host_name needs 8 bytes but only 3"),
    "empty host_name": (stream(sni_ext(b"")), "host_name is empty"),
    "only a dot": (stream(sni_ext(b".")), "b'.' has an empty label"),
    "double dot": (stream(sni_ext(b"a..com")), "b'a..com' has an empty label"),
    "leading dot": (stream(sni_ext(b".a.com")), "has an empty label"),
    "two trailing dots": (stream(sni_ext(b"a.com..")), "has an empty label"),
    "host_name over 255": (stream(sni_ext(b"a." * 128)), "host_name is 256 bytes, over 255"),
    "label over 63": (stream(sni_ext(b"a" * 64 + b".com")), "has a label over 63 bytes"),
    "space in host_name": (stream(sni_ext(b"a b.com")), "contains b' '"),
    "colon in host_name": (stream(sni_ext(b"::1")), "contains b':'"),
    "nul in host_name": (stream(sni_ext(b"a.com\x00.evil")), "contains b'\\x00'"),
    "utf-8 host_name": (stream(sni_ext("bücher.example".encode())), "contains b'\\xc3'"),
    "two host_names": (stream(sni_ext(b"a.com", b"b.com")), "more than one host_name"),
    "empty alpn list": (stream(ext(16, u16(0))), "ALPN: the protocol list is empty"),
    "empty alpn name": (stream(alpn_ext(b"h2", b"")), "ALPN: empty protocol name"),
    "alpn name overrun": (stream(ext(16, u16(3) + u8(5) + b"h2")), "protocol name needs 5 bytes but only 2"),
    "alpn trailing bytes": (stream(ext(16, u16(3) + u8(2) + b"h2" + b"x")), "ALPN: 1 unexpected trailing bytes"),
    "odd supported_versions": (stream(ext(43, u8(3) + b"\x03\x04\x03")), "list length 3 must be even"),
    "empty supported_versions": (stream(ext(43, u8(0))), "list length 0 must be even"),
    "supported_versions trailing": (stream(ext(43, u8(2) + b"\x03\x04\x00")), "supported_versions: 1 unexpected trailing"),
}


@pytest.mark.parametrize("name", MALFORMED)
def test_each_malformed_reason(name):
    data, needle = MALFORMED[name]
    result = parse(data)
    assert isinstance(result, Malformed), result
    assert needle in result.reason
    assert feed_bytewise(data) == result


def test_malformed_is_decided_as_soon_as_the_bytes_show_it():
    # declared sizes are checked from the headers, before the payload arrives
    assert isinstance(parse(HEADER + u16(2**14 + 2049)), Malformed)
    assert isinstance(parse(HEADER + u16(300) + u8(2)), Malformed)
    assert isinstance(parse(HEADER + u16(300) + u8(1) + (70000).to_bytes(3, "big")), Malformed)
    assert parse(HEADER + u16(300) + u8(1) + (290).to_bytes(3, "big")) is NEED_MORE


@pytest.mark.parametrize(
    "data, needle",
    [
        (HEADER + u16(96), "record at offset 0 would end at byte 101, over max_size 100"),
        (HEADER + u16(90) + u8(1) + (92).to_bytes(3, "big"), "declares 92 bytes, so needs at least 101"),
        # 16 one-byte records end at 96: the next record header cannot fit in 100
        (records(handshake(bytes(80)), [1] * 16), "still incomplete at 96 bytes; max_size is 100"),
    ],
)
def test_max_size_limits(data, needle):
    result = parse(data, max_size=100)
    assert isinstance(result, Malformed) and needle in result.reason
    assert feed_bytewise(data, max_size=100) == result


def test_hello_of_exactly_max_size():
    data = stream(TYPICAL)
    assert parse(data, max_size=len(data)).size == len(data)
    assert "over max_size" in parse(data, max_size=len(data) - 1).reason


# ---------------------------------------------------------------- single pass


def count_lines_executed(data: bytes) -> int:
    lines = 0

    def tracer(frame, event, arg):
        nonlocal lines
        if event == "line" and frame.f_code.co_filename == clienthello.__file__:
            lines += 1
        return tracer

    parser = ClientHelloParser()
    sys.settrace(tracer)
    try:
        result = parser.feed(data)
    finally:
        sys.settrace(None)
    assert isinstance(result, ClientHello)
    return lines


def test_one_chunk_parse_does_no_per_byte_work():
    # Same structure (records, extensions, list items), very different byte counts:
    # the executed Python lines must be identical, so no line runs per byte.
    suites = (0x1301,) * 3
    small = stream(TYPICAL + ext(21, bytes(10)), suites=suites)
    long_names = sni_ext(b"a" * 63 + b".b" * 90) + alpn_ext(b"h" * 255, b"2" * 200)
    long_names += versions_ext(0x304, 0x303) + ext(21, bytes(10))
    assert count_lines_executed(stream(long_names, suites=(0x1301,) * 3)) == count_lines_executed(small)
    assert count_lines_executed(stream(TYPICAL + ext(21, bytes(10)), suites=(0x1301,) * 3000)) == count_lines_executed(small)
    small4 = stream(TYPICAL + ext(21, bytes(10)), suites=suites, sizes=[10, 10, 10])
    big4 = stream(TYPICAL + ext(21, bytes(60000)), suites=suites, sizes=[16000, 16000, 16000])
    assert count_lines_executed(big4) == count_lines_executed(small4)


# ---------------------------------------------------------------- corpus

CORPUS_FILES = sorted(CORPUS.glob("*.bin"))


def test_corpus_is_present():
    assert len(CORPUS_FILES) >= 10
    assert any(json.loads(f.with_suffix(".json").read_text())["records"] > 1 for f in CORPUS_FILES)


@pytest.mark.parametrize("path", CORPUS_FILES, ids=lambda p: p.stem)
def test_corpus_hello(path):
    data = path.read_bytes()
    meta = json.loads(path.with_suffix(".json").read_text())
    result = parse(data)
    assert isinstance(result, ClientHello), result
    assert (result.sni, list(result.alpn), result.size) == (meta["sni"], meta["alpn"], meta["size"])
    assert result.size == len(data)
    if "tls12" in path.stem:
        assert result.versions == (0x0303,)
    else:
        assert 0x0304 in result.versions
    assert feed_bytewise(data) == result
    assert feed_in_pieces(data, range(7, len(data), 13)) == result
    assert parse(data[:-1]) is NEED_MORE


# ---------------------------------------------------------------- fuzz

FINAL_TYPES = (ClientHello, NotTLS, Malformed)


def check_any_input(data: bytes, cuts: list[int], max_size: int):
    whole = parse(data, max_size)
    assert whole is NEED_MORE or isinstance(whole, FINAL_TYPES)
    assert "internal parser error" not in getattr(whole, "reason", "")
    assert feed_in_pieces(data, cuts, max_size) == whole
    return whole


cuts_for = st.lists(st.integers(min_value=0, max_value=70000), max_size=12)


@settings(max_examples=400, deadline=None)
@given(data=st.binary(max_size=300), cuts=cuts_for, max_size=st.integers(64, 400))
@example(data=b"\x16\x03\x01\x00\x05\x01\x00\x00\x01\x00", cuts=[], max_size=64)
def test_fuzz_random_bytes(data, cuts, max_size):
    check_any_input(data, cuts, max_size)


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200), cuts=cuts_for)
def test_fuzz_random_bytes_after_a_tls_header(data, cuts):
    check_any_input(HEADER + data, cuts, 65536)
    check_any_input(HEADER + u16(len(data) + 4) + u8(1) + len(data).to_bytes(3, "big") + data, cuts, 65536)


host_labels = st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1, max_size=20)
ignored_types = st.integers(1, 65535).filter(lambda t: t not in (16, 43))


@st.composite
def valid_hellos(draw):
    """A valid hello stream split into random records, and the answer it must give."""
    labels = draw(st.lists(host_labels, min_size=1, max_size=5))
    host = ".".join(labels) + draw(st.sampled_from(["", "."]))
    alpn = draw(st.lists(st.binary(min_size=1, max_size=12), max_size=4))
    versions = draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=5))
    suites = draw(st.lists(st.integers(0, 0xFFFF), min_size=1, max_size=20))
    others = draw(st.dictionaries(ignored_types, st.binary(max_size=1500), max_size=4))
    parts = [ext(t, d) for t, d in others.items()]
    parts += [sni_ext(host.encode()), versions_ext(*versions)] + ([alpn_ext(*alpn)] if alpn else [])
    parts = draw(st.permutations(parts))
    legacy_version = draw(st.integers(0, 0xFFFF))
    message = handshake(body(b"".join(parts), suites=tuple(suites), legacy_version=legacy_version))
    sizes = draw(st.lists(st.integers(1, 2000), max_size=8))
    data = records(message, sizes if sum(sizes) < len(message) else None)
    expected = ClientHello(
        sni=host.lower().removesuffix("."),
        alpn=tuple(p.decode("latin-1") for p in alpn),
        versions=tuple(versions),
        legacy_version=legacy_version,
        cipher_suites=tuple(suites),
        size=len(data),
    )
    return data, expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hello=valid_hellos(), cuts=cuts_for)
def test_fuzz_valid_hellos_any_split(hello, cuts):
    data, expected = hello
    assert parse(data) == expected
    assert feed_in_pieces(data, cuts) == expected
    assert parse(data[: len(data) // 2]) is NEED_MORE


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    hello=st.one_of(valid_hellos().map(lambda h: h[0]), st.sampled_from([f.read_bytes() for f in CORPUS_FILES])),
    edits=st.lists(st.tuples(st.integers(0, 20000), st.integers(0, 255), st.sampled_from("xdi")), min_size=1, max_size=6),
    truncate=st.integers(0, 20000),
    cuts=cuts_for,
)
def test_fuzz_mutated_and_truncated_hellos(hello, edits, truncate, cuts):
    data = bytearray(hello)
    for offset, value, how in edits:
        at = offset % (len(data) + 1)
        if how == "x" and at < len(data):
            data[at] ^= value or 1
        elif how == "d":
            del data[at : at + 1 + value % 4]
        else:
            data[at:at] = bytes([value])
    check_any_input(bytes(data), cuts, 65536)
    check_any_input(bytes(data[: truncate % (len(data) + 1)]), cuts, 65536)
