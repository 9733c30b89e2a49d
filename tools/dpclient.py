"""A test client to check by hand where dynproxy sends a connection.

    python tools/dpclient.py tcp HOST:PORT [--send TEXT]
    python tools/dpclient.py tls HOST:PORT --sni NAME [--alpn h2,http/1.1] [--insecure] [--ca FILE]
    python tools/dpclient.py udp HOST:PORT [--send TEXT]
    common options: [--count N] [--timeout SECONDS] [--expect NAME[,NAME...]]

It prints `answered by: <the reply's first line>` (the demo backends reply
`backend=NAME port=... peer=... got=...`) or `failed: <why>`: `connection refused`,
`closed without an answer (rejected?)`, `timeout after 3s`, a TLS handshake error.

`tls` sends a real ClientHello with the given SNI and ALPN. When the reply is not TLS
(a passthrough proxy in front of a plaintext demo backend) the handshake cannot
complete, and the plaintext reply is printed as the answer; when the peer speaks TLS
(the proxy terminates, or a TLS backend) the handshake completes, --send is sent
inside TLS, and the decrypted reply is printed.

`--count N` repeats with a new connection (a new source port) each time and ends with
`tally: NAME=COUNT ...` (handy to see weights). `--expect` lists the backends allowed
to answer. Exit status 0 when every attempt got an answer (from an expected backend),
1 otherwise, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import codecs
import re
import socket
import ssl
import sys
import time
from collections import Counter
from dataclasses import dataclass

BACKEND = re.compile(r"backend=(\S+)")
ANSWER_LIMIT = 64 * 1024
DEFAULT_SEND = {"tcp": "ping\n", "tls": "ping\n", "udp": "ping"}
SEND_HELP = "what to send; \\n, \\r and \\xNN are understood (default: ping)"
PLAINTEXT_NOTE = ("  (a plaintext reply to the ClientHello: TLS was passed through to a "
                  "non-TLS backend, so the handshake stops here)")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One attempt: an answer line (answered) or the reason there was none."""

    answered: bool
    text: str
    note: str = ""

    @property
    def backend(self) -> str | None:
        match = BACKEND.search(self.text) if self.answered else None
        return match.group(1) if match else None


class NoAnswer(Exception):
    """The attempt ended without an answer; the message is what the operator reads."""


def failure(message: str) -> Outcome:
    return Outcome(False, message)


def parse_address(text: str) -> tuple[str, int]:
    """HOST:PORT or [IPv6]:PORT -> (host, port); ValueError with a hint otherwise."""
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\s]+):(\d{1,5})", text.strip())
    if not match or int(match.group(2) or match.group(4)) > 65535:
        raise ValueError(f"bad address {text!r}; expected HOST:PORT or [IPv6]:PORT")
    return (match.group(1) or match.group(3)), int(match.group(2) or match.group(4))


def answer_text(reply: bytes) -> str:
    """The line that names the backend (HTTP bodies included), else the first line."""
    text = reply.decode("utf-8", "replace")
    for line in text.splitlines():
        if BACKEND.search(line):
            return line.strip()
    return (text.splitlines() or [""])[0].strip() or repr(reply[:64])


class Deadline:
    """One budget for a whole attempt: connect, handshake and reading the answer."""

    def __init__(self, seconds: float):
        self.seconds, self.end = seconds, time.monotonic() + seconds

    def arm(self, sock: socket.socket) -> None:
        left = self.end - time.monotonic()
        if left <= 0:
            raise TimeoutError
        sock.settimeout(left)

    def message(self) -> str:
        return f"timeout after {self.seconds:g}s"


def recv(sock: socket.socket, deadline: Deadline) -> bytes:
    deadline.arm(sock)
    return sock.recv(65536)


def read_line(sock: socket.socket, deadline: Deadline, buf: bytes = b"") -> bytes:
    """Read until a newline, EOF or ANSWER_LIMIT; a timeout with a partial line returns it."""
    while b"\n" not in buf and len(buf) < ANSWER_LIMIT:
        try:
            chunk = recv(sock, deadline)
        except TimeoutError:
            if buf:
                return buf
            raise
        if not chunk:
            break
        buf += chunk
    return buf


def attempt(run, deadline: Deadline) -> Outcome:
    """Run one probe, turning the usual socket failures into operator-readable outcomes."""
    try:
        return run()
    except NoAnswer as exc:
        return failure(str(exc))
    except ConnectionRefusedError:
        return failure("connection refused")
    except ConnectionResetError:
        return failure("connection reset by peer (rejected?)")
    except TimeoutError:
        return failure(deadline.message())
    except OSError as exc:
        return failure(f"{exc.strerror or exc}")


def probe_tcp(address: tuple[str, int], payload: bytes, deadline: Deadline) -> Outcome:
    def run() -> Outcome:
        with socket.create_connection(address, timeout=deadline.seconds) as sock:
            if payload:
                sock.sendall(payload)
            reply = read_line(sock, deadline)
        if not reply:
            raise NoAnswer("closed without an answer (rejected?)")
        return Outcome(True, answer_text(reply))

    return attempt(run, deadline)


def probe_udp(address: tuple[str, int], payload: bytes, deadline: Deadline) -> Outcome:
    def run() -> Outcome:
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.connect(address)  # connected: an ICMP unreachable becomes ECONNREFUSED
            sock.send(payload)
            return Outcome(True, answer_text(recv(sock, deadline)))

    return attempt(run, deadline)


def tls_context(alpn: list[str], insecure: bool, ca: str | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=ca)
    if insecure:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def looks_like_tls(data: bytes) -> bool:
    """A TLS record starts with a content type 20..24 and major version 3."""
    return len(data) >= 2 and 20 <= data[0] <= 24 and data[1] == 3


class TlsProbe:
    """A ClientHello driven through memory BIOs, so a plaintext reply can still be read."""

    def __init__(self, sock: socket.socket, context: ssl.SSLContext, sni: str, deadline):
        self.sock, self.deadline = sock, deadline
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname=sni)

    def handshake(self) -> bytes | None:
        """Complete the handshake (None), or return the peer's plaintext reply."""
        got_tls = False
        while True:
            try:
                self.tls.do_handshake()
                self.flush()
                return None
            except ssl.SSLWantReadError:
                self.flush()
            data = recv(self.sock, self.deadline)
            if not data:
                raise NoAnswer("closed without an answer (rejected?)" if not got_tls
                               else "closed during the TLS handshake (rejected?)")
            if not got_tls and not looks_like_tls(data):
                return read_line(self.sock, self.deadline, data)
            got_tls = True
            self.incoming.write(data)

    def exchange(self, payload: bytes) -> bytes:
        """Send payload inside TLS and read the decrypted reply up to a newline."""
        if payload:
            self.tls.write(payload)
            self.flush()
        reply = b""
        while b"\n" not in reply and len(reply) < ANSWER_LIMIT:
            try:
                reply += self.tls.read(65536)
            except ssl.SSLWantReadError:
                data = recv(self.sock, self.deadline)
                if not data:
                    break
                self.incoming.write(data)
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break  # the peer closed; whatever came is the answer
        return reply

    def flush(self) -> None:
        pending = self.outgoing.read()
        if pending:
            self.sock.sendall(pending)

    def describe(self) -> str:
        cert = self.tls.getpeercert() or {}
        subject = dict(pair for rdn in cert.get("subject", ()) for pair in rdn)
        names = ",".join(value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS")
        shown = f"cert CN={subject['commonName']} SAN={names}" if subject else "cert unverified"
        return (f"  (TLS completed: {self.tls.version()}, "
                f"alpn={self.tls.selected_alpn_protocol() or '-'}, {shown})")


def probe_tls(address, context: ssl.SSLContext, sni: str, payload: bytes,
              deadline: Deadline) -> Outcome:
    def run() -> Outcome:
        with socket.create_connection(address, timeout=deadline.seconds) as sock:
            probe = TlsProbe(sock, context, sni, deadline)
            try:
                plaintext = probe.handshake()
                if plaintext is not None:
                    return Outcome(True, answer_text(plaintext), PLAINTEXT_NOTE)
                reply = probe.exchange(payload)
            except ssl.SSLCertVerificationError as exc:
                raise NoAnswer(f"TLS handshake failed: {exc.verify_message} "
                               "(use --ca FILE or --insecure)") from None
            except ssl.SSLError as exc:
                raise NoAnswer(f"TLS handshake failed: {exc.reason or exc}") from None
        if not reply:
            raise NoAnswer("closed without an answer after the TLS handshake (rejected?)")
        return Outcome(True, answer_text(reply), probe.describe())

    return attempt(run, deadline)


def report(outcome: Outcome, expected: set[str], show_note: bool) -> bool:
    """Print one attempt; True when it answered from an expected backend."""
    if not outcome.answered:
        print(f"failed: {outcome.text}")
        return False
    print(f"answered by: {outcome.text}")
    if show_note and outcome.note:
        print(outcome.note)
    if expected and outcome.backend not in expected:
        print(f"unexpected backend {outcome.backend!r}; expected {', '.join(sorted(expected))}")
        return False
    return True


def tally_line(outcomes: list[Outcome]) -> str:
    counts = Counter(o.backend or "?" for o in outcomes if o.answered)
    parts = [f"{name}={n}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    failed = sum(not o.answered for o in outcomes)
    return "tally: " + " ".join(parts + ([f"failed={failed}"] if failed else []))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpclient.py", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 2)[2])
    modes = parser.add_subparsers(dest="mode", required=True)
    for mode in ("tcp", "tls", "udp"):
        sub = modes.add_parser(mode)
        sub.add_argument("address", metavar="HOST:PORT")
        sub.add_argument("--send", default=DEFAULT_SEND[mode], help=SEND_HELP)
        sub.add_argument("--count", type=int, default=1, help="attempts (default 1)")
        sub.add_argument("--timeout", type=float, default=3.0, help="seconds per attempt")
        sub.add_argument("--expect", help="comma-separated backends allowed to answer")
    tls = modes.choices["tls"]
    tls.add_argument("--sni", required=True, help="server name to send in the ClientHello")
    tls.add_argument("--alpn", default="", help="protocols to offer, e.g. h2,http/1.1")
    tls.add_argument("--insecure", action="store_true", help="do not verify the certificate")
    tls.add_argument("--ca", help="CA file to verify the certificate with")
    return parser


def make_probe(args):
    # escape_decode keeps UTF-8 as is and turns \n, \r, \xNN into bytes ("GET / ...\r\n\r\n")
    address, payload = parse_address(args.address), codecs.escape_decode(args.send.encode())[0]
    if args.mode == "tcp":
        return lambda: probe_tcp(address, payload, Deadline(args.timeout))
    if args.mode == "udp":
        return lambda: probe_udp(address, payload, Deadline(args.timeout))
    context = tls_context([p for p in args.alpn.split(",") if p], args.insecure, args.ca)
    return lambda: probe_tls(address, context, args.sni, payload, Deadline(args.timeout))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.count < 1 or args.timeout <= 0:
        parser.error("--count must be at least 1 and --timeout more than 0")
    try:
        probe = make_probe(args)
    except (ValueError, OSError) as exc:  # a bad address, an unreadable --ca file
        parser.error(str(exc))
    expected = {name.strip() for name in (args.expect or "").split(",") if name.strip()}
    outcomes, good = [], True
    for _ in range(args.count):
        outcomes.append(probe())
        good = report(outcomes[-1], expected, show_note=args.count == 1) and good
    if args.count > 1:
        print(tally_line(outcomes))
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
