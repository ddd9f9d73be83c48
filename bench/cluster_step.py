"""Per-step latency of the cluster executor — compiled graph (one lane, two micro-batch lanes) and
plain remote calls — against the local executor, on the same actors; prints a table of medians.

    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m bench.cluster_step [--model DIR]'

(Ray starts here, so run it in a loopback-only network namespace as above.)"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from engine.executor import StepInput

# (name, sequences, new tokens per sequence); decode steps continue at position 32
SHAPES = [("decode B=1", 1, 1), ("decode B=8", 8, 1), ("prefill 4x16", 4, 16), ("prefill 4x128", 4, 128)]


def step(num_seqs: int, length: int) -> StepInput:
    start = 32 if length == 1 else 0
    n = num_seqs * length
    tokens = tuple(torch.randint(2, 300, (n,), generator=torch.Generator().manual_seed(n)).tolist())
    last = tuple(length * (b + 1) - 1 for b in range(num_seqs))
    return StepInput(tokens, tuple(range(num_seqs)), (start,) * num_seqs, (length,) * num_seqs, last)


def median_ms(executor, s: StepInput, repeats: int) -> float:
    for _ in range(2):
        executor.execute(s)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        executor.execute(s)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint directory (default: a tiny Qwen3-Next made here)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--expert-shards", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from model.tiny import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny", arch="qwen3_next", dtype="float32"))
        run(model, args.repeats, args.expert_shards)


def run(model: str, repeats: int, expert_shards: int) -> None:
    import ray

    from cluster.executor import ClusterExecutor
    from engine.config import NextserveConfig
    from engine.local_executor import LocalExecutor

    root = str(Path(__file__).resolve().parents[1])
    ray.init(num_cpus=16, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    config = NextserveConfig.from_args({"pools": {"experts": {"actors": expert_shards}}})
    cluster = ClusterExecutor(model, dtype="float32", num_slots=8, max_model_len=256, config=config)
    local = LocalExecutor(model, dtype="float32", num_slots=8, max_model_len=256)
    modes = {
        "local": (local, None),
        "compiled, 1 lane": (cluster, dict(compiled_graph=True, micro_batch_tokens=0)),
        "compiled, 2 lanes": (cluster, dict(compiled_graph=True, micro_batch_tokens=32)),
        "plain remote": (cluster, dict(compiled_graph=False, micro_batch_tokens=0)),
        "plain remote, 2 mb": (cluster, dict(compiled_graph=False, micro_batch_tokens=32)),
    }
    print(f"model {model}: {cluster.config.num_hidden_layers} layers, placement "
          f"{[m.name for m in cluster.placement.mixers]} + {cluster.placement.num_shards} expert shards; "
          f"median ms per step over {repeats} (2-lane modes split steps of >= 32 tokens)")
    print(f"{'mode':<20}" + "".join(f"{name:>16}" for name, _, _ in SHAPES))
    try:
        for mode, (executor, settings) in modes.items():
            if settings is not None:
                executor.configure_step(**settings)
            row = [median_ms(executor, step(b, n), repeats) for _, b, n in SHAPES]
            print(f"{mode:<20}" + "".join(f"{ms:>16.2f}" for ms in row), flush=True)
    finally:
        cluster.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
