"""Capture one real TLS ClientHello for the parser's test corpus.

Listens on 127.0.0.1, accepts one connection, reads TLS records until the
handshake message they carry is complete, writes exactly those record bytes to
OUT.bin and a sidecar OUT.json holding what the client was asked to send (the
test checks the parser against it), then closes the connection; the client's
handshake then fails, which is expected.

Framing is done here with its own few lines on purpose: the corpus checks
dynproxy.core.clienthello, so it must not be cut by that parser.

    python tools/capture_clienthello.py OUT.bin --sni www.example.com --alpn h2,http/1.1 \\
        --client "openssl s_client ..." [--port 0]

It prints ``listening on 127.0.0.1:PORT`` (flushed) before accepting, so a script can
start the client then.  Exit status 0 on success, 1 on a closed or odd stream.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
from pathlib import Path


def read_exact(conn: socket.socket, count: int) -> bytes:
    chunks = []
    while count:
        chunk = conn.recv(count)
        if not chunk:
            raise EOFError(f"client closed with {count} bytes of the ClientHello missing")
        chunks.append(chunk)
        count -= len(chunk)
    return b"".join(chunks)


def read_hello_records(conn: socket.socket) -> tuple[bytes, int]:
    """Return the raw records carrying the first handshake message, and their count."""
    records, payload, need = [], b"", None
    while need is None or len(payload) < need:
        header = read_exact(conn, 5)
        if header[0] != 22:
            raise ValueError(f"record type {header[0]} is not a handshake (22); header {header!r}")
        body = read_exact(conn, int.from_bytes(header[3:5], "big"))
        records.append(header + body)
        payload += body
        if need is None and len(payload) >= 4:
            need = 4 + int.from_bytes(payload[1:4], "big")
    return b"".join(records), len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="where to write the .bin (sidecar .json beside it)")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--sni", default=None, help="the SNI the parser must report (omit: none)")
    parser.add_argument("--alpn", default="", help="comma-separated ALPN the parser must report")
    parser.add_argument("--client", default="", help="the client command, for the record")
    parser.add_argument("--timeout", type=float, default=20.0)
    args = parser.parse_args(argv)
    with socket.create_server(("127.0.0.1", args.port)) as server:
        server.settimeout(args.timeout)
        print(f"listening on 127.0.0.1:{server.getsockname()[1]}", flush=True)
        conn, _ = server.accept()
        with conn:
            conn.settimeout(args.timeout)
            try:
                raw, count = read_hello_records(conn)
            except (EOFError, ValueError, OSError) as exc:
                print(f"capture failed: {exc}", file=sys.stderr)
                return 1
    args.out.write_bytes(raw)
    sidecar = {
        "client": args.client,
        "sni": args.sni,
        "alpn": [p for p in args.alpn.split(",") if p],
        "records": count,
        "size": len(raw),
    }
    args.out.with_suffix(".json").write_text(json.dumps(sidecar, indent=2) + "\n")
    print(f"wrote {args.out} ({len(raw)} bytes in {count} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
