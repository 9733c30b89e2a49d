#!/usr/bin/env bash
# Installs what the test suite needs on a fresh Debian machine: the package with its
# test extras, and the real programs the tests start (redis-server, openssl, socat).
# Safe to run again: it installs only what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
for prog in redis-server:redis-server openssl:openssl socat:socat; do
  command -v "${prog%%:*}" >/dev/null 2>&1 || missing+=("${prog##*:}")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
python3 -m pip install -q --disable-pip-version-check -e '.[test]'
