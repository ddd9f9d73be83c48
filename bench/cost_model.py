"""A cost model of the cluster executor's decode step: per-layer compute (attention, DeltaNet mixer,
the slowest expert shard), per-edge latency, layers, micro-batches and batch → step ms and tokens/s.
`--validate` measures compiled steps with their step telemetry at several depths and batches on
this machine and compares; `--plan` prints the plan for Qwen3-Next-80B on 8×H100.

    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m bench.cost_model --validate \\
        --depths 4 12 48 --batch 1 8 32'
    .venv/bin/python -m bench.cost_model --plan

The model. Every MoE layer's mixer → shards → next mixer puts two edges on a lane's critical path
(the carry to the next mixer travels beside the shards), plus driver → first mixer and last mixer →
driver. With one micro-batch nothing overlaps:
    step = Σ_l (mixer_l + experts_l) + (2·moe_layers + 2)·edge
With m micro-batches (lanes) on actors with their own cores or GPUs (ping-pong), the step is the
step graph's static schedule played out (`schedule_ms`): each actor runs its calls in the order
cluster/step_graph.py binds them (layer by layer, lanes in turn), a call starts when its actor is
free and its inputs have arrived (an edge after they were made), compute taken at the lane's share
of the batch. In steady state a layer then costs
    max(m·mixer_l, m·experts_l, mixer_l + experts_l + 2·edge)
(the mixer's m turns, the shards' m turns, or one lane's round trip through the layer), not
their sum: the pipeline runs at its busiest stage, plus filling and draining it. Actors that share
cores overlap nothing: m turns of the one-micro-batch sum."""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from bench.cluster_step import markdown_table


@dataclass(frozen=True)
class LayerCost:
    """ms per layer at one (micro-)batch size."""

    attention_ms: float
    deltanet_ms: float
    experts_ms: float  # the slowest shard


@dataclass(frozen=True)
class Shape:
    layers: int
    attention_layers: int
    moe_layers: int

    @property
    def deltanet_layers(self) -> int:
        return self.layers - self.attention_layers

    def kinds(self) -> list[tuple[str, bool]]:
        """(mixer kind, MoE?) per layer: attention every layers/attention_layers-th layer (Qwen3-Next's
        3:1), MoE layers spread evenly (all of them in Qwen3-Next)."""
        every = self.layers // self.attention_layers if self.attention_layers else 0
        out = []
        for i in range(self.layers):
            kind = "attention" if every and (i + 1) % every == 0 else "deltanet"
            moe = (i + 1) * self.moe_layers // self.layers > i * self.moe_layers // self.layers
            out.append((kind, moe))
        return out


def schedule_ms(shape: Shape, cost: Callable[[int], LayerCost], lanes: Sequence[int],
                edge_ms: float) -> float:
    """ms of one step of `lanes[i]` sequences per lane, played out on the step graph's static schedule:
    one attention and one DeltaNet actor, the expert shards as one stage (they run side by side and
    `experts_ms` is the slowest); each actor's calls in bind order, a call starting when its actor is
    free and its inputs are in (an edge after they were made; an actor's own carry costs none)."""
    costs = [cost(max(1, n)) for n in lanes]
    free = {"attention": 0.0, "deltanet": 0.0, "experts": 0.0}
    carry = [(edge_ms, "driver") for _ in lanes]  # when each lane's carry was made, and where
    partial: list[float | None] = [None] * len(lanes)  # when its shards answered (None: no MoE layer)
    for kind, moe in shape.kinds():
        for i, c in enumerate(costs):
            t, at = carry[i]
            ready = t + (0.0 if at == kind else edge_ms) if at != "driver" else t
            if partial[i] is not None:
                ready = max(ready, partial[i] + edge_ms)
            done = max(free[kind], ready) + (c.attention_ms if kind == "attention" else c.deltanet_ms)
            free[kind] = done
            carry[i] = (done, kind)
            partial[i] = None
            if moe:
                end = max(free["experts"], done + edge_ms) + c.experts_ms
                free["experts"] = end
                partial[i] = end
    last = shape.kinds()[-1][0]
    finish = []
    for i in range(len(lanes)):  # the last mixer's finish calls (combine + head: no cost here), in turn
        t, _ = carry[i]
        ready = max(t, partial[i] + edge_ms) if partial[i] is not None else t
        free[last] = max(free[last], ready)
        finish.append(free[last] + edge_ms)
    return max(finish)


def lane_sizes(batch: int, m: int) -> list[int]:
    """Sequences per lane of a decode step split in m (cluster/micro_batch.py: near-equal)."""
    m = max(1, min(m, batch))
    return [batch // m + (1 if i < batch % m else 0) for i in range(m)]


def step_ms(shape: Shape, cost: Callable[[int], LayerCost], batch: int, edge_ms: float,
            micro_batches: int = 1, own_cores: bool = True) -> float:
    """Predicted ms of one decode step of `batch` sequences."""
    lanes = lane_sizes(batch, micro_batches)
    if len(lanes) == 1 or not own_cores:
        return sum(schedule_ms(shape, cost, [n], edge_ms) for n in lanes)
    return schedule_ms(shape, cost, lanes, edge_ms)


def single_process_ms(shape: Shape, cost: Callable[[int], LayerCost], batch: int) -> float:
    """The same compute with no hops: what one process holding the whole model would take."""
    c = cost(batch)
    return (shape.attention_layers * c.attention_ms + shape.deltanet_layers * c.deltanet_ms
            + shape.moe_layers * c.experts_ms)


def max_edge_ms(shape: Shape, cost: Callable[[int], LayerCost], batch: int, within: float = 1.2,
                micro_batches: int = 1) -> float:
    """The largest per-edge latency that keeps a step within `within` × the single-process one
    (bisection; step_ms grows with edge_ms)."""
    target = within * single_process_ms(shape, cost, batch)
    lo, hi = 0.0, target
    if step_ms(shape, cost, batch, 0.0, micro_batches) > target:
        return 0.0
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if step_ms(shape, cost, batch, mid, micro_batches) <= target else (lo, mid)
    return lo


# -- Qwen3-Next-80B-A3B on 8×H100 (README, "Sizing"): 1 attention GPU, 1 DeltaNet GPU, 6 expert shards
QWEN3_NEXT_80B = Shape(layers=48, attention_layers=12, moe_layers=48)
HBM_BYTES_PER_MS = 3.35e9  # H100 SXM HBM3, 3.35 TB/s (NVIDIA H100 datasheet)
LAUNCH_FLOOR_MS = 0.02  # a layer's kernels on one GPU rarely take less (assumed, not measured)
CONTEXT = 2048  # tokens per sequence the attention reads
# Published latencies, ms per edge: Ray's docs give "less than 50us system overhead" per task of a
# compiled graph (docs.ray.io, ray-core/compiled-graph/ray-compiled-graph.html); NVLink p2p of a
# few KiB by NCCL is ~10 µs (assumed from NCCL's own latency-bound range, not measured here).
EDGES_MS = {"Ray compiled graph task, docs": 0.050, "NCCL p2p NVLink, ~10 µs": 0.010}


def h100_cost(batch: int, shards: int = 6) -> LayerCost:
    """Memory-bound decode per layer: the weights a layer reads once per step, plus per-sequence
    state (DeltaNet 2 MiB fp32 per sequence and layer; attention 2 KiB of bf16 KV per token)."""
    deltanet = (33.7e6 * 2 + batch * 32 * 128 * 128 * 4) / HBM_BYTES_PER_MS
    attention = (27.3e6 * 2 + batch * CONTEXT * 2048) / HBM_BYTES_PER_MS
    touched = 512 * (1 - (1 - 10 / 512) ** batch)  # distinct experts a step's tokens pick
    experts = math.ceil(touched / shards) * 3 * 2048 * 512 * 2 / HBM_BYTES_PER_MS
    return LayerCost(max(attention, LAUNCH_FLOOR_MS), max(deltanet, LAUNCH_FLOOR_MS),
                     max(experts, LAUNCH_FLOOR_MS))


def plan_table(batches: tuple[int, ...] = (1, 8, 32, 64)) -> str:
    rows = []
    for b in batches:
        single = single_process_ms(QWEN3_NEXT_80B, h100_cost, b)
        need1 = max_edge_ms(QWEN3_NEXT_80B, h100_cost, b)
        need2 = max_edge_ms(QWEN3_NEXT_80B, h100_cost, b, micro_batches=2)
        for name, e in EDGES_MS.items():
            for m in (1, 2):
                s = step_ms(QWEN3_NEXT_80B, h100_cost, b, e, m)
                rows.append([b, name, 1e3 * e, m, s, 1e3 * b / s, f"{s / single:.2f}×",
                             1e3 * (need1 if m == 1 else need2)])
    return markdown_table(["batch", "edge", "edge µs", "micro-batches", "step ms", "tokens/s",
                           "vs single process", "edge µs for ≤1.2×"], rows)


# -- validation on this machine ----------------------------------------------------------------
def measure(depth: int, batches: list[int], repeats: int, rounds: int, modes: list[str]) -> dict:
    """Compiled (and local) step times with step telemetry for a `depth`-layer tiny Qwen3-Next."""
    import tempfile
    from pathlib import Path

    from bench.cluster_step import bench_model
    from model.config import ModelConfig
    from model.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = str(make_tiny_model(Path(tmp) / "m", overrides={"num_hidden_layers": depth}))
        c = ModelConfig.from_dir(model_dir)
        t = bench_model(model_dir, batches, modes, repeats, rounds, expert_shards=2)
    shape = Shape(c.num_hidden_layers, len(c.attention_layers), len(c.moe_layers))
    return {"shape": shape, "timings": t}


def per_layer(shape: Shape, actors: list[dict[str, float]]) -> LayerCost:
    med = {k: statistics.median(a.get(k, 0.0) for a in actors) for k in ("attention", "deltanet", "experts")}
    return LayerCost(med["attention"] / max(1, shape.attention_layers),
                     med["deltanet"] / max(1, shape.deltanet_layers),
                     med["experts"] / max(1, shape.moe_layers))


def validate(depths: list[int], batches: list[int], repeats: int, rounds: int) -> None:
    """Per-layer compute from each run's own telemetry; one edge latency for all runs: the median of
    what each run implies ((measured − compute) / critical edges), printed per run beside it."""
    from pathlib import Path

    import ray

    root = str(Path(__file__).resolve().parents[1])
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        runs = {d: measure(d, batches, repeats, rounds, ["compiled"]) for d in depths}
    finally:
        ray.shutdown()
    points = []
    for d, r in runs.items():
        for b in batches:
            t = r["timings"]["compiled", b]
            cost = per_layer(r["shape"], t.actors)
            compute = step_ms(r["shape"], lambda _, c=cost: c, b, 0.0)
            implied = (t.median_ms - compute) / (2 * r["shape"].moe_layers + 2)
            points.append((d, b, t.median_ms, compute, implied, r["shape"], cost))
    edge = statistics.median(p[4] for p in points)
    print(f"edge latency: {1e3 * edge:.0f} µs per critical-path edge (median over the runs)")
    rows = []
    for d, b, measured, compute, implied, shape, cost in points:
        pred = step_ms(shape, lambda _, c=cost: c, b, edge)
        err = pred / measured - 1
        rows.append([d, b, measured, compute, 1e3 * implied, pred, f"{100 * err:+.0f} %",
                     "ok" if abs(err) <= 0.25 else "outside ±25 %"])
    print(markdown_table(["depth", "batch", "measured ms", "compute ms", "implied edge µs", "predicted ms",
                          "error", ""], rows))
    print("\n### Qwen3-Next-80B on 8×H100 (1 attention, 1 DeltaNet, 6 expert GPUs)\n")
    print(plan_table())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--validate", action="store_true", help="measure here and compare (starts Ray)")
    ap.add_argument("--plan", action="store_true", help="print the 80B plan")
    ap.add_argument("--depths", type=int, nargs="+", default=[4, 12, 48])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--repeats", type=int, default=6)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    if args.validate:
        validate(args.depths, args.batch, args.repeats, args.rounds)
    else:  # --plan, the default
        print(plan_table())


if __name__ == "__main__":
    main()
