#!/usr/bin/env bash
# Debian's prometheus and chromium, for the tests that run a real Prometheus against the app and
# open /dashboard in a headless browser (tests/monitoring). Only as root on Debian (CI); elsewhere
# those tests are skipped and say why. Idempotent: nothing is fetched when both are installed.
set -euo pipefail
if [ "$(id -u)" != 0 ] || [ ! -f /etc/debian_version ] || ! command -v apt-get >/dev/null; then
    echo "note: not root on Debian; skipping prometheus/chromium (their tests will be skipped)" >&2
    exit 0
fi
if command -v prometheus >/dev/null && command -v chromium >/dev/null; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
# The package's own service is not wanted (the tests start Prometheus on a free loopback port):
# policy-rc.d exit 101 tells the package scripts not to start services while installing.
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && made_policy=1
fi
trap 'if [ "$made_policy" = 1 ]; then rm -f "$policy"; fi' EXIT
apt-get update -qq
apt-get install -y -qq --no-install-recommends prometheus chromium >/dev/null
