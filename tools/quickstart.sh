#!/usr/bin/env bash
# The quick start: see dynproxy route traffic on this machine, in one command.
#
#   bash tools/quickstart.sh          # demo, then keep running until Ctrl-C
#   bash tools/quickstart.sh --once   # demo, stop everything; exit 0 when every demo
#                                     # connection reached the expected backend (CI)
#
# It installs the package if `dynproxy` is not importable, starts the demo backends
# (tools/demo_backends.py: web-a :9001, web-b :9002, api :9003, dns :9053/udp), starts
# the proxy on rules/main.rules, sends a few connections through it with
# tools/dpclient.py and prints which backend answered each. It stops only what it
# started, by PID. Environment: PYTHON (default python3), QS_TCP_BIND (127.0.0.1:8080),
# QS_UDP_BIND (127.0.0.1:8081), QS_METRICS_BIND (127.0.0.1:9090), QS_WORKERS (1).
set -euo pipefail

once=0
case "${1:-}" in
  --once) once=1 ;;
  "") ;;
  -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  *) echo "quickstart: unknown argument '$1' (use --once or nothing)" >&2; exit 2 ;;
esac

cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
TCP_BIND="${QS_TCP_BIND:-127.0.0.1:8080}"
UDP_BIND="${QS_UDP_BIND:-127.0.0.1:8081}"
METRICS_BIND="${QS_METRICS_BIND:-127.0.0.1:9090}"
WORKERS="${QS_WORKERS:-1}"   # one worker: the weighted round robin shows exactly 3:1
LOGS="$(mktemp -d "${TMPDIR:-/tmp}/dynproxy-quickstart.XXXXXX")"
pids=()

stop_started() {
  # TERM asks for a graceful stop; the proxy then drains, and counts an idle UDP
  # session as open, so a second TERM after 2 s switches it to a fast stop (nothing
  # of the demo's is in flight by then); KILL only if that fails too.
  local pid
  [ "${#pids[@]}" -eq 0 ] || echo "quickstart: stopping what it started (pids ${pids[*]})" >&2
  signal_all TERM
  wait_all 20 || signal_all TERM
  wait_all 50 || signal_all KILL
  for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}
signal_all() { local pid; for pid in "${pids[@]}"; do kill "-$1" "$pid" 2>/dev/null || true; done; }
wait_all() {  # TENTHS_OF_A_SECOND -> 0 when every started process has ended
  local _ pid
  for _ in $(seq "$1"); do
    for pid in "${pids[@]}" ""; do [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && break; done
    [ -z "$pid" ] && return 0
    sleep 0.1
  done
  return 1
}
trap 'status=$?; trap - EXIT; stop_started; exit $status' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

say() { printf '\n==> %s\n' "$*"; }
die() { printf '\nquickstart: %s\n' "$*" >&2; exit 1; }
show_log() { echo "--- last lines of $1:" >&2; tail -n 20 "$1" >&2 || true; }

port_free() {  # HOST:PORT proto -> 0 when nothing listens there
  "$PY" - "$1" "$2" <<'EOF'
import socket, sys
host, port = sys.argv[1].rsplit(":", 1)
host = host.strip("[]")
kind = socket.SOCK_STREAM if sys.argv[2] == "tcp" else socket.SOCK_DGRAM
family = socket.AF_INET6 if ":" in host else socket.AF_INET
with socket.socket(family, kind) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, int(port)))
    except OSError:
        sys.exit(1)
EOF
}

# From the repo root `import dynproxy` finds the source tree, so ask for its
# dependencies too (pyproject.toml's list): missing ones mean "not installed yet".
importable() { "$1" -c 'import dynproxy, gevent, lark, yaml, click, prometheus_client, redis' 2>/dev/null; }
if ! importable "$PY"; then
  if [ -x .venv/bin/python ] && importable .venv/bin/python; then
    PY=.venv/bin/python   # installed there by an earlier quick start
  else
    say "installing dynproxy ($PY -m pip install -e .)"
    if ! "$PY" -m pip install -q -e .; then
      # A system Python that refuses pip (PEP 668, e.g. Debian 12): use a venv instead.
      say "installing into a virtual environment instead: .venv"
      "$PY" -m venv .venv || die "cannot create .venv; install python3-venv (Debian: apt-get install python3-venv)"
      .venv/bin/python -m pip install -q -e . || die "pip install failed; see the messages above"
      PY=.venv/bin/python
    fi
  fi
fi
DYNPROXY="dynproxy"
command -v dynproxy >/dev/null 2>&1 || DYNPROXY="$PY -m dynproxy"

while read -r addr proto var; do
  port_free "$addr" "$proto" ||
    die "$addr/$proto is in use by another program; choose another, e.g. $var=127.0.0.1:18080 $0"
done <<BINDS
$TCP_BIND tcp QS_TCP_BIND
$UDP_BIND udp QS_UDP_BIND
$METRICS_BIND tcp QS_METRICS_BIND
BINDS

say "starting the demo backends (log: $LOGS/backends.log)"
"$PY" tools/demo_backends.py >"$LOGS/backends.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do
  grep -q '^ready' "$LOGS/backends.log" && break
  kill -0 "${pids[0]}" 2>/dev/null || { show_log "$LOGS/backends.log"; die "the demo backends did not start"; }
  sleep 0.1
done
grep -q '^ready' "$LOGS/backends.log" || { show_log "$LOGS/backends.log"; die "the demo backends did not start within 10 s"; }
grep '^listening' "$LOGS/backends.log" | sed 's/^/    /'

say "starting dynproxy on rules/main.rules (log: $LOGS/proxy.log)"
echo "    $PY -m dynproxy --rules rules/main.rules --tcp-bind $TCP_BIND --udp-bind $UDP_BIND --metrics-bind $METRICS_BIND --workers $WORKERS"
"$PY" -m dynproxy --rules rules/main.rules --tcp-bind "$TCP_BIND" --udp-bind "$UDP_BIND" \
  --metrics-bind "$METRICS_BIND" --workers "$WORKERS" >"$LOGS/proxy.log" 2>&1 &
pids+=($!)

# Ready when a connection goes through: the port listens AND the pool's health checks
# have found a member up (that takes `rise` checks, a few seconds).
ready=0
for _ in $(seq 60); do
  kill -0 "${pids[1]}" 2>/dev/null || { show_log "$LOGS/proxy.log"; die "dynproxy exited during start-up"; }
  if "$PY" tools/dpclient.py tcp "$TCP_BIND" --timeout 1 >/dev/null 2>&1; then ready=1; break; fi
  sleep 0.5
done
[ "$ready" = 1 ] || { show_log "$LOGS/proxy.log"; die "no connection got through dynproxy within 30 s"; }

shown() {  # the arguments as one would type them: quoted only where needed
  local arg out=()
  for arg in "$@"; do
    if [[ "$arg" =~ ^[A-Za-z0-9_./:,=@+-]+$ ]]; then out+=("$arg"); else out+=("'$arg'"); fi
  done
  echo "${out[*]}"
}

failures=0
demo() {  # TITLE, then dpclient arguments
  local title="$1"; shift
  say "$title"
  echo "    \$ python3 tools/dpclient.py $(shown "$@")"
  if "$PY" tools/dpclient.py "$@" | sed 's/^/    /'; [ "${PIPESTATUS[0]}" -eq 0 ]; then
    echo "    ok"
  else
    echo "    NOT AS EXPECTED"; failures=$((failures + 1))
  fi
}

demo "plain TCP, no SNI: no rule matches, so 'default -> forward(web)' picks web-a or web-b" \
  tcp "$TCP_BIND" --send 'hello' --expect web-a,web-b
demo "TLS with SNI api.example.com: 'rule api' passes the TLS through to backend api" \
  tls "$TCP_BIND" --sni api.example.com --expect api
demo "TLS with SNI www.example.com, 8 times: 'rule sites' -> pool web, weights 3:1" \
  tls "$TCP_BIND" --sni www.example.com --count 8 --expect web-a,web-b
demo "UDP datagram: 'rule dns' -> backend dns" \
  udp "$UDP_BIND" --send 'hello dns' --expect dns

say "try more"
cat <<EOF
    python3 tools/dpclient.py tls $TCP_BIND --sni shop.example.com --count 20
    python3 tools/dpclient.py tls $TCP_BIND --sni example.org   # no rule: the default
    python3 tools/dpclient.py udp $UDP_BIND --send 'any text'
    curl -s http://$TCP_BIND/                   # HTTP through the proxy
    curl -s http://$METRICS_BIND/metrics | grep '^proxy_'
    $DYNPROXY repl --rules rules/main.rules      # where would a connection go, and why?
    edit rules/main.rules, then: $DYNPROXY lint rules/main.rules
    logs: $LOGS/proxy.log (one access-log line per connection)
          $LOGS/backends.log (one line per connection a backend served)
EOF

if [ "$once" = 1 ]; then
  if [ "$failures" -eq 0 ]; then
    say "every demo connection reached the expected backend"; rm -rf "$LOGS"; exit 0
  fi
  say "$failures demo(s) did not reach the expected backend; see $LOGS"; exit 1
fi
say "dynproxy is running; press Ctrl-C to stop it and the demo backends"
wait "${pids[1]}" || true
show_log "$LOGS/proxy.log"
die "dynproxy stopped on its own"
