#!/usr/bin/env bash
# System tools the deployment tests use: Prometheus (promtool), docker-compose (compose validation), wrk.
# Installed with apt when missing and we may (root); otherwise those tests skip and say why.
set -uo pipefail
need=()
command -v promtool >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v wrk >/dev/null || need+=(wrk)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${need[*]} for the deployment tests"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || echo "could not install ${need[*]}: the tests that need them will skip"
  # Debian starts the Prometheus service on install; the tests run their own.
  command -v systemctl >/dev/null && systemctl stop prometheus prometheus-node-exporter 2>/dev/null
  pkill -x prometheus 2>/dev/null; pkill -f prometheus-node-exporter 2>/dev/null
else
  echo "missing ${need[*]}: the tests that need them will skip (install them, or run as root)"
fi
exit 0
