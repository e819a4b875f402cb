#!/usr/bin/env bash
# Installs the system packages Event-Pulse needs (Debian/Ubuntu): redis-server for the
# system of record, prometheus for monitoring, chromium for the waiting-room browser test,
# wrk for the joins benchmark (`python -m bench.joins`).
set -euo pipefail
need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v prometheus >/dev/null || need+=(prometheus)
command -v promtool >/dev/null || need+=(prometheus)
command -v chromium >/dev/null || need+=(chromium fonts-liberation)
command -v wrk >/dev/null || need+=(wrk)
[ ${#need[@]} -eq 0 ] && exit 0
if ! command -v apt-get >/dev/null; then
  echo "missing: ${need[*]} — install them with your package manager" >&2; exit 1
fi
sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
echo "installing ${need[*]} with apt-get" >&2
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
