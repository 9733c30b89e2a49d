"""The newcomer's tools: demo backends, the dpclient test client, gen_certs, and the
bundled rule files. Real subprocesses and sockets on 127.0.0.1, free ports only."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from sockio import recv_to_eof

ROOT = Path(__file__).resolve().parents[2]
TOOLS = ROOT / "tools"
PEER = r"peer=127\.0\.0\.1:\d+"


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Demo:
    """tools/demo_backends.py in a subprocess; ports are read from its `listening` lines."""

    def __init__(self, *specs: str, extra: tuple = ()):
        args = [sys.executable, str(TOOLS / "demo_backends.py"), "--duration", "60", *extra]
        for spec in specs:
            args += ["--spec", spec]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        self.ports: dict[str, int] = {}
        self.ca: str | None = None
        for line in self._lines_until("ready"):
            if line.startswith("listening "):
                _, name, _, address = line.split()
                self.ports[name] = int(address.rsplit(":", 1)[1])
            if "--ca " in line:
                self.ca = line.split("--ca ", 1)[1]

    def _lines_until(self, prefix: str) -> list[str]:
        lines = []
        while not lines or not lines[-1].startswith(prefix):
            line = self.proc.stdout.readline()
            assert line, f"demo_backends ended early: {self.proc.stderr.read()}"
            lines.append(line.rstrip("\n"))
        return lines

    def next_served(self) -> str:
        return self._lines_until("served ")[-1].removeprefix("served ")

    def address(self, name: str) -> str:
        return f"127.0.0.1:{self.ports[name]}"

    def stop(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=10)
        return self.proc.returncode, out


@pytest.fixture
def demo():
    started: list[Demo] = []

    def start(*specs: str, **kw) -> Demo:
        started.append(Demo(*specs, **kw))
        return started[-1]

    yield start
    for d in started:
        if d.proc.poll() is None:
            d.proc.kill()
        d.proc.communicate()


def dpclient(*args: str) -> tuple[int, list[str]]:
    done = subprocess.run([sys.executable, str(TOOLS / "dpclient.py"), *args],
                          capture_output=True, text=True, timeout=20)
    assert done.stderr == ""
    return done.returncode, done.stdout.splitlines()


# --- demo backends + dpclient over real sockets ------------------------------------


def test_tcp_answer_names_the_backend_and_the_first_bytes(demo):
    d = demo("web-a=127.0.0.1:0")
    port = d.ports["web-a"]
    code, out = dpclient("tcp", d.address("web-a"), "--send", "hello")
    assert code == 0
    assert len(out) == 1
    assert re.fullmatch(rf"answered by: backend=web-a port={port} {PEER} got=68656c6c6f", out[0])
    assert d.next_served() == out[0].removeprefix("answered by: ")


def test_a_client_that_sends_nothing_still_gets_its_line(demo):
    d = demo("web-b=127.0.0.1:0")
    code, out = dpclient("tcp", d.address("web-b"), "--send", "")
    assert code == 0
    assert re.fullmatch(rf"answered by: backend=web-b port={d.ports['web-b']} {PEER} got=", out[0])


def test_tls_clienthello_passed_to_a_plaintext_backend_prints_its_line(demo):
    d = demo("api=127.0.0.1:0")
    code, out = dpclient("tls", d.address("api"), "--sni", "api.example.com", "--alpn", "h2")
    assert code == 0
    match = re.fullmatch(rf"answered by: backend=api port={d.ports['api']} {PEER} got=(\w+)",
                         out[0])
    assert match, out
    got = bytes.fromhex(match.group(1))
    assert len(got) == 16
    assert got[0] == 0x16 and got[1] == 3 and got[5] == 0x01  # handshake record, ClientHello
    assert out[1].startswith("  (a plaintext reply to the ClientHello")
    assert len(out) == 2


def test_tls_to_a_tls_backend_completes_the_handshake_and_verifies(demo):
    d = demo("api-tls=127.0.0.1:0/tls")
    assert d.ca is not None and Path(d.ca).is_file()
    code, out = dpclient("tls", d.address("api-tls"), "--sni", "api.example.com", "--ca", d.ca)
    assert code == 0
    assert re.fullmatch(rf"answered by: backend=api-tls port={d.ports['api-tls']} {PEER} "
                        r"got=70696e670a", out[0])
    assert out[1] == ("  (TLS completed: TLSv1.3, alpn=-, cert CN=api.example.com "
                      "SAN=api.example.com)")

    code, out = dpclient("tls", d.address("api-tls"), "--sni", "api.example.com")
    assert code == 1
    assert out == ["failed: TLS handshake failed: unable to get local issuer certificate "
                   "(use --ca FILE or --insecure)"]

    code, out = dpclient("tls", d.address("api-tls"), "--sni", "www.example.com", "--ca", d.ca)
    assert code == 1
    assert out[0].startswith("failed: TLS handshake failed: Hostname mismatch")


def test_udp_round_trip(demo):
    d = demo("dns=127.0.0.1:0/udp")
    code, out = dpclient("udp", d.address("dns"), "--send", "hello dns")
    assert code == 0
    assert re.fullmatch(rf"answered by: backend=dns port={d.ports['dns']} {PEER} got=hello dns",
                        out[0])
    assert d.next_served() == out[0].removeprefix("answered by: ")


def test_count_prints_every_answer_and_a_tally(demo):
    d = demo("web-a=127.0.0.1:0", "dns=127.0.0.1:0/udp")
    code, out = dpclient("tcp", d.address("web-a"), "--count", "3")
    assert code == 0
    assert len(out) == 4
    assert all(line.startswith("answered by: backend=web-a ") for line in out[:3])
    assert len({re.search(r"peer=(\S+)", line).group(1) for line in out[:3]}) == 3
    assert out[3] == "tally: web-a=3"
    code, out = dpclient("udp", d.address("dns"), "--count", "2")
    assert (code, out[-1]) == (0, "tally: dns=2")


def test_expect_names_the_backends_allowed_to_answer(demo):
    d = demo("web-a=127.0.0.1:0")
    code, out = dpclient("tcp", d.address("web-a"), "--expect", "web-a,web-b")
    assert code == 0
    code, out = dpclient("tcp", d.address("web-a"), "--expect", "api")
    assert code == 1
    assert out[1] == "unexpected backend 'web-a'; expected api"


def test_http_request_gets_an_http_response_and_later_bytes_are_echoed(demo):
    d = demo("web-a=127.0.0.1:0")
    with socket.create_connection(("127.0.0.1", d.ports["web-a"]), timeout=5) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: demo\r\n\r\n")
        reply = recv_to_eof(s)
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert f"Content-Length: {len(body)}".encode() in head
    assert re.fullmatch(rf"backend=web-a port={d.ports['web-a']} {PEER} "
                        r"got=474554202f7820485454502f312e310d\n", body.decode())

    with socket.create_connection(("127.0.0.1", d.ports["web-a"]), timeout=5) as s:
        s.sendall(b"first")
        assert s.recv(4096).startswith(b"backend=web-a ")
        s.sendall(b"second")
        assert s.recv(4096) == b"second"


# --- dpclient failures ---------------------------------------------------------------


def test_connection_refused_tcp_and_udp():
    for mode, kind in (("tcp", socket.SOCK_STREAM), ("udp", socket.SOCK_DGRAM)):
        code, out = dpclient(mode, f"127.0.0.1:{free_port(kind)}")
        assert (code, out) == (1, ["failed: connection refused"])


def test_timeout_when_nobody_answers():
    with socket.socket() as silent_tcp, socket.socket(type=socket.SOCK_DGRAM) as silent_udp:
        silent_tcp.bind(("127.0.0.1", 0))
        silent_tcp.listen(8)  # the kernel completes the handshake; nobody ever answers
        silent_udp.bind(("127.0.0.1", 0))
        for mode, sock in (("tcp", silent_tcp), ("udp", silent_udp)):
            address = f"127.0.0.1:{sock.getsockname()[1]}"
            code, out = dpclient(mode, address, "--timeout", "0.3")
            assert (code, out) == (1, ["failed: timeout after 0.3s"])


def test_closed_without_an_answer_looks_like_a_reject():
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        for mode in ("tcp", "tls"):
            extra = ("--sni", "x.example.com") if mode == "tls" else ()
            client = subprocess.Popen(
                [sys.executable, str(TOOLS / "dpclient.py"), mode,
                 f"127.0.0.1:{server.getsockname()[1]}", *extra],
                stdout=subprocess.PIPE, text=True)
            conn, _ = server.accept()
            conn.recv(65536)  # drain what the client sent, so closing sends FIN, not RST
            conn.close()
            out, _ = client.communicate(timeout=20)
            assert (client.returncode, out) == (1, "failed: closed without an answer (rejected?)\n")


def test_bad_address_is_a_usage_error():
    done = subprocess.run([sys.executable, str(TOOLS / "dpclient.py"), "tcp", "nonsense"],
                          capture_output=True, text=True, timeout=20)
    assert done.returncode == 2
    assert "bad address 'nonsense'; expected HOST:PORT or [IPv6]:PORT" in done.stderr


def test_tally_line_counts_failures_and_sorts_by_count():
    client = load_tool("dpclient")
    outcomes = [client.Outcome(True, "backend=web-b port=1"),
                client.Outcome(True, "backend=web-a port=1"),
                client.Outcome(True, "backend=web-a port=1"),
                client.Outcome(False, "connection refused")]
    assert client.tally_line(outcomes) == "tally: web-a=2 web-b=1 failed=1"
    assert client.parse_address("[::1]:8443") == ("::1", 8443)
    assert client.answer_text(b"HTTP/1.1 200 OK\r\n\r\nbackend=api port=1\n") == "backend=api port=1"


# --- demo backends: start, stop and bad input -------------------------------------


def test_sigterm_and_duration_stop_cleanly(demo):
    d = demo("web-a=127.0.0.1:0")
    code, out = d.stop()
    assert (code, out.splitlines()[-1]) == (0, "stopped")
    done = subprocess.run([sys.executable, str(TOOLS / "demo_backends.py"), "--duration", "0.2",
                           "--spec", "a=127.0.0.1:0"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 0
    assert done.stdout.splitlines()[-2:] == ["ready (1 backends; Ctrl-C to stop)", "stopped"]


def test_bad_spec_and_busy_port_exit_1_with_a_hint():
    run = [sys.executable, str(TOOLS / "demo_backends.py"), "--duration", "5", "--spec"]
    done = subprocess.run([*run, "web-a:9001"], capture_output=True, text=True, timeout=20)
    assert done.returncode == 1
    assert "bad --spec 'web-a:9001'; expected NAME=HOST:PORT[/udp|/tls]" in done.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        done = subprocess.run([*run, f"web-a=127.0.0.1:{port}"], capture_output=True,
                              text=True, timeout=20)
    assert done.returncode == 1
    assert f"cannot listen for 'web-a' on 127.0.0.1:{port}/tcp: Address already in use" \
        in done.stderr


def test_udp_payload_text_shows_binary_as_hex():
    backends = load_tool("demo_backends")
    assert backends.udp_payload_text(b"hello\n") == "hello"
    assert backends.udp_payload_text(b"\x12\x34\x01\x00") == "hex:12340100"
    assert backends.parse_spec("dns=[::1]:53/udp") == backends.BackendSpec("dns", "::1", 53, "udp")


# --- gen_certs -----------------------------------------------------------------------


def test_gen_certs_writes_pairs_that_ssl_loads(tmp_path):
    from cryptography import x509

    done = subprocess.run([sys.executable, str(TOOLS / "gen_certs.py"), str(tmp_path)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "tls:\n  cert_path: " in done.stdout
    expected = {"server": ["localhost"], "api": ["api.example.com"],
                "wildcard": ["*.example.com"]}
    for stem, names in expected.items():
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(tmp_path / f"{stem}.crt", tmp_path / f"{stem}.key")
        cert = x509.load_pem_x509_certificate((tmp_path / f"{stem}.crt").read_bytes())
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == names
        assert os.stat(tmp_path / f"{stem}.key").st_mode & 0o777 == 0o600
    client = ssl.create_default_context(cafile=tmp_path / "ca.crt")
    assert client.get_ca_certs()[0]["subject"] == ((("commonName", "dynproxy test CA"),),)


def test_gen_certs_functions_make_expired_and_mismatched_pairs(tmp_path):
    import datetime

    gen = load_tool("gen_certs")
    ca = gen.make_ca()
    past = datetime.datetime(2020, 1, 1, tzinfo=datetime.timezone.utc)
    expired = gen.make_leaf(ca, ["old.example.com"], not_before=past, days=30)
    assert expired.cert.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc)
    files = gen.write_pair(gen.Issued(expired.cert, gen.make_key()), tmp_path, "mismatch")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with pytest.raises(ssl.SSLError):
        context.load_cert_chain(files.cert_path, files.key_path)


# --- the bundled rule files and the quick start script ------------------------------


RULE_FILES = sorted([ROOT / "rules" / "main.rules", *(ROOT / "rules" / "examples").glob("*.rules")])


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_bundled_rule_files_lint_clean(path):
    import dynproxy.lang

    rules = dynproxy.lang.load(path)  # raises RulesError on any error
    assert rules.diagnostics == ()  # and no warnings either
    assert rules.rules


def test_main_rules_route_the_quick_start_demo():
    import dynproxy.lang

    rules = dynproxy.lang.load(ROOT / "rules" / "main.rules")
    cases = {("tcp", "api.example.com"): "api", ("tcp", "www.example.com"): "web",
             ("tcp", "a.b.example.com"): "web", ("tcp", None): "web", ("udp", None): "dns",
             ("tcp", "example.com"): "web"}
    for (proto, sni), target in cases.items():
        decision = rules.decide(proto=proto, sni=sni, dport=8080, src="127.0.0.1")
        assert (decision.action, [t.name for t in decision.targets]) == ("forward", [target])
    members = {m.backend.name: m.weight for m in rules.pools["web"].members}
    assert members == {"web-a": 3, "web-b": 1}
    demo_names = {spec.split("=")[0] for spec in load_tool("demo_backends").DEFAULT_SPECS}
    assert set(rules.backends) == demo_names


def test_quickstart_script_parses_and_refuses_unknown_arguments():
    script = str(TOOLS / "quickstart.sh")
    assert subprocess.run(["bash", "-n", script], timeout=20).returncode == 0
    done = subprocess.run(["bash", script, "--bogus"], capture_output=True, text=True,
                          timeout=20)
    assert done.returncode == 2
    assert "unknown argument '--bogus'" in done.stderr
