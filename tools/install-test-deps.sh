#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: the package with its
# test extras, and the real programs the tests start (redis-server, openssl, socat).
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
# redis-server, openssl, socat: integration tests; haproxy, nginx (+ stream module), wrk,
# iperf3, gcc: the benchmark's smoke test (tools/bench) runs them side by side.
for prog in redis-server:redis-server openssl:openssl socat:socat haproxy:haproxy \
            nginx:nginx wrk:wrk iperf3:iperf3 gcc:gcc; do
  command -v "${prog%%:*}" >/dev/null 2>&1 || missing+=("${prog##*:}")
done
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
