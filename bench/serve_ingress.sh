#!/usr/bin/env bash
# Serve's proxy vs the replica's own HTTP server (Ray Serve 2.60 direct ingress), same server, same
# run: `nextserve serve --ingress proxy` (local executor, max_num_seqs 32, otherwise ray_config.yaml)
# started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1 keeps Serve's proxy on port 8000 and gives the
# replica port 30000; with `haproxy` as the first argument, RAY_SERVE_ENABLE_HA_PROXY=1 puts HAProxy on 8000
# instead (needs the haproxy binary). bench/serve.py's load then alternates between the two URLs,
# three times per concurrency (8 requests at concurrency 1, 32 otherwise; 64 output tokens).
# Everything runs in a loopback-only network namespace; the server is stopped by its PID.
#   flock /tmp/bench.lock bash bench/serve_ingress.sh [direct|haproxy] [CONCURRENCY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
MODE=${1:-direct}
shift || true
[ $# -gt 0 ] || set -- 1 16 32
mkdir -p .bench
sed -e 's/executor: cluster/executor: local/' -e 's/max_num_seqs: 16/max_num_seqs: 32/' ray_config.yaml \
    > .bench/ingress.yaml
exec unshare -n bash -c '
set -euo pipefail
ip link set lo up
PYTHON=$1 MODE=$2
shift 2
case $MODE in
    direct) export RAY_SERVE_ENABLE_DIRECT_INGRESS=1 ;;
    haproxy) export RAY_SERVE_ENABLE_HA_PROXY=1 ;;
    *) echo "first argument: direct or haproxy" >&2; exit 2 ;;
esac
PYTHONPATH=$PWD "$PYTHON" -m deployments.cli serve --config .bench/ingress.yaml --ingress proxy \
    > .bench/ingress-serve.log 2>&1 &
srv=$!
trap "kill -INT $srv 2>/dev/null; wait $srv 2>/dev/null || true" EXIT
for _ in $(seq 1 180); do
    curl -sf -m 2 http://127.0.0.1:8000/health >/dev/null && break
    kill -0 $srv || { echo "nextserve serve exited; see .bench/ingress-serve.log" >&2; exit 1; }
    sleep 1
done
curl -sf -m 2 http://127.0.0.1:30000/health >/dev/null || { echo "no replica on port 30000" >&2; exit 1; }
for c in "$@"; do
    n=32; [ "$c" = 1 ] && n=8
    for rep in 1 2 3; do
        for url in http://127.0.0.1:8000 http://127.0.0.1:30000; do
            echo "== concurrency $c, run $rep, $url"
            "$PYTHON" -m bench.serve --url $url --no-hf --num-requests $n --concurrency $c \
                | grep -E "engine steps|^\| nextserve" | head -2
        done
    done
done
' bash "$PYTHON" "$MODE" "$@"
