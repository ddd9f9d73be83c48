"""Object-store memory held after compiled step graphs are torn down while their actors live (as
`configure_step` and `cluster.idle_release_s` do): prints plasma usage after each rebuild. Seen with
Ray 2.60: every compile keeps its channels' buffers (Ray's default 1e6 bytes each, whatever
`cluster.buffer_size_bytes` says) until the actors die, so the store fills after a few rebuilds and
the raylet then allocates from files until it runs out of descriptors (README, "Ping-pong
micro-batches").

    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m bench.channel_leak \\
        --layers 8 --rebuilds 4'"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from bench.cluster_step import decode_step


def plasma_line() -> str:
    import ray
    from ray._private.internal_api import memory_summary

    summary = memory_summary(address=ray.get_runtime_context().gcs_address, stats_only=True)
    return next((line.strip() for line in summary.splitlines() if "Plasma memory usage" in line), "?")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--rebuilds", type=int, default=4, help="rounds of (1 lane, 3 lanes) graphs")
    args = ap.parse_args(argv)
    import ray

    from cluster.executor import ClusterExecutor
    from deployments.config import NextserveConfig
    from model.tiny import make_tiny_model

    root = str(Path(__file__).resolve().parents[1])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            model_dir = str(make_tiny_model(Path(tmp) / "m", overrides={"num_hidden_layers": args.layers}))
            ex = ClusterExecutor(model_dir, dtype="float32", num_slots=8, max_model_len=64,
                                 config=NextserveConfig.from_args({"cluster": {"idle_release_s": 0}}))
            try:
                print(f"first graph: {plasma_line()}", flush=True)
                for i in range(args.rebuilds):
                    for lanes in (1, 3):
                        ex.configure_step(micro_batch_tokens=0 if lanes == 1 else 1, micro_batches=3)
                        for _ in range(3):
                            ex.execute(decode_step(8))
                        print(f"rebuild {i}, {lanes} lane(s): {plasma_line()}", flush=True)
            finally:
                ex.shutdown()
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
