"""Ping-pong micro-batches where every actor has a core of its own, simulated on a small machine: the
real cluster executor (its default sockets data plane, or `--data-plane`; loopback Ray) on a tiny
Qwen3-Next of some depth, whose actors compute the real result and then sleep until each call has
taken a calibrated time. A sleeping actor leaves its core free, so the lanes' overlap is real, as on
actors with their own GPUs; greedy results stay those of the model. Decode steps at batch B in m =
1, 2, 3 lanes (`cluster.micro_batches`); tokens/s and the cost model's prediction
(bench/cost_model.py) beside each, its edge latency fitted on the one-lane runs of the same run.

    flock /tmp/bench.lock unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m bench.pingpong \\
        --depths 12 48 --batch 8 32 --lanes 1 2 3'

A call's time (the sleep target, real compute included) is per layer, for the call's n tokens:
- `--profile h100-80b` (default): Qwen3-Next-80B on H100s as the cost model's plan estimates it
  (bench/cost_model.py `h100_cost`: memory-bound, weights read once per call, so splitting a
  batch does not halve a call), slowed by `--dilate` (default 500: a layer then takes 12–37 ms here, well
  above the tiny model's own compute, and this machine's hops, ~0.3–5 ms, stand for 0.6–10 µs there);
- `--profile linear`: `--mixer-ms` / `--expert-ms` per layer at `--ref-batch` tokens, of which
  `--fixed-share` does not depend on n (0: compute-bound, n/ref-batch of it).
Expert shards see the rows routed to them (about every token here: top-4 of 16 experts on 2
shards). The worker classes are subclasses defined here, put in place of those cluster/actors.py
starts for this run only (no hook in the production code)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.cluster_step import MAX_MODEL_LEN, actor_ms, decode_step, markdown_table, step_times
from bench.cost_model import LayerCost, Shape, h100_cost, step_ms
from cluster.messages import Carry, ShardResult, ShardWork, StepMsg
from cluster.workers import ExpertWorker, MixerWorker


@dataclass(frozen=True)
class Profile:
    """ms per call of one layer, by kind, for a call of n tokens."""

    kind: str  # h100-80b | linear
    dilate: float = 500.0
    mixer_ms: float = 8.0
    expert_ms: float = 8.0
    ref_batch: int = 32
    fixed_share: float = 0.0

    def cost(self, n: int) -> LayerCost:
        if self.kind == "h100-80b":
            c = h100_cost(max(1, n))
            return LayerCost(self.dilate * c.attention_ms, self.dilate * c.deltanet_ms,
                             self.dilate * c.experts_ms)
        share = self.fixed_share + (1 - self.fixed_share) * n / self.ref_batch
        return LayerCost(self.mixer_ms * share, self.mixer_ms * share, self.expert_ms * share)

    def describe(self) -> str:
        if self.kind == "h100-80b":
            return f"h100-80b ×{self.dilate:g}"
        return (f"linear: mixer {self.mixer_ms:g} ms, experts {self.expert_ms:g} ms per layer at "
                f"{self.ref_batch} tokens, fixed share {self.fixed_share:g}")


def _pad(start: float, target_ms: float) -> None:
    """Sleep until `target_ms` after `start`."""
    left = target_ms / 1e3 - (time.perf_counter() - start)
    if left > 0:
        time.sleep(left)


class SleepyMixer(MixerWorker):
    """A mixer whose `run` takes the profile's time for its kind and the micro-batch's tokens
    (at least: a call whose real compute is longer is not shortened); the sleep goes into the
    carry's telemetry like compute."""

    profile: Profile  # set on the subclass made per run (`sleepy_classes`)

    def run(self, layer: int, msg: StepMsg, carry: Carry | None, *partials: Any):
        start = time.perf_counter()
        out = super().run(layer, msg, carry, *partials)
        if msg.step is None:
            return out
        returned = time.perf_counter()
        c = self.profile.cost(len(msg.step.token_ids))
        _pad(start, c.attention_ms if self.spec.pool == "attention" else c.deltanet_ms)
        first = out[0] if isinstance(out, tuple) else out
        padded = time.perf_counter() - returned  # the run measured itself; add what came after
        first = dataclasses.replace(first, telemetry=first.telemetry.add(self.spec.name, padded))
        return (first, *out[1:]) if isinstance(out, tuple) else first


class SleepyShard(ExpertWorker):
    profile: Profile

    def run(self, work: ShardWork | None) -> ShardResult | None:
        start = time.perf_counter()
        out = super().run(work)
        if out is None:
            return None
        _pad(start, self.profile.cost(int(work.x.shape[0])).experts_ms)
        return dataclasses.replace(out, seconds=time.perf_counter() - start)


def sleepy_classes(profile: Profile) -> tuple[type, type]:
    """Subclasses carrying `profile` (pickled by value into the actors)."""
    mixer = type("SleepyMixerRun", (SleepyMixer,), {"profile": profile, "__module__": __name__})
    shard = type("SleepyShardRun", (SleepyShard,), {"profile": profile, "__module__": __name__})
    return mixer, shard


@dataclass
class Point:
    depth: int
    batch: int
    lanes: int
    steps_s: list[float]
    actors: list[dict[str, float]]
    shape: Shape

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.steps_s)

    def inside_ms(self) -> dict[str, float]:
        return {k: statistics.median(a.get(k, 0.0) for a in self.actors) for k in ("attention", "deltanet",
                                                                                   "experts")}


# A decode step's messages are a few KiB. Ray's default channel buffer (1e6 bytes, times
# max_inflight_executions buffers per channel, some channels taking Ray's default rather than the
# graph's buffer size) filled the object store at depth 48 with 3 lanes: the raylet then allocated
# from files until it ran out of descriptors and died. So every process gets this default too.
BUFFER_BYTES = 1 << 16
NODE_POOLS = {"attention": "mixer_node", "deltanet": "mixer_node", "experts": "expert_node"}


def run_depth(model_dir: str, depth: int, batches: Sequence[int], lanes: Sequence[int], repeats: int,
              rounds: int, poll_us: float | None, expert_shards: int, nodes: bool = False,
              data_plane: str = "sockets") -> list[Point]:
    from cluster.executor import ClusterExecutor
    from deployments.config import NextserveConfig
    from model.config import ModelConfig

    c = ModelConfig.from_dir(model_dir)
    shape = Shape(c.num_hidden_layers, len(c.attention_layers), len(c.moe_layers))
    args: dict[str, Any] = {"pools": {"experts": {"actors": expert_shards}},
                            "cluster": {"step_timeout_s": 120, "idle_release_s": 0, "timeout_s": 600,
                                        "buffer_size_bytes": BUFFER_BYTES}}
    if poll_us is not None:
        args["cluster"]["channel_poll_us"] = poll_us
    if nodes:  # each pool on its kind of node, by custom resources
        for pool, resource in NODE_POOLS.items():
            args["pools"].setdefault(pool, {})["resources"] = {"resources": {resource: 1}}
    cluster = ClusterExecutor(model_dir, dtype="float32", num_slots=max(batches), max_model_len=MAX_MODEL_LEN,
                              config=NextserveConfig.from_args(args))
    points: dict[tuple[int, int], Point] = {}
    try:
        if nodes:
            import ray

            table = ray.util.placement_group_table
            where = {name: sorted(n[:8] for n in table(pg)["bundles_to_node_id"].values())
                     for name, pg in cluster.session.groups.items()}
            print(f"depth {depth}: pools on nodes {where}", flush=True)
        for _ in range(rounds):
            for m in lanes:
                if m == 1:
                    cluster.configure_step(data_plane=data_plane, micro_batch_tokens=0)
                else:
                    cluster.configure_step(data_plane=data_plane, micro_batch_tokens=1, micro_batches=m)
                for b in batches:
                    steps, actors = step_times(cluster, decode_step(b), max(1, repeats // rounds))
                    p = points.setdefault((b, m), Point(depth, b, m, [], [], shape))
                    p.steps_s += steps
                    p.actors += actors if len(actors) == len(steps) else []
        actor_ms(cluster)
    finally:
        cluster.shutdown()
    return [points[b, m] for b in batches for m in lanes]


def measured_cost(p: Point) -> Callable[[int], LayerCost]:
    """Per call of one layer and lane, from the run's step telemetry (the shards: the slowest)."""
    inside, m = p.inside_ms(), p.lanes
    c = LayerCost(inside["attention"] / max(1, p.shape.attention_layers * m),
                  inside["deltanet"] / max(1, p.shape.deltanet_layers * m),
                  inside["experts"] / max(1, p.shape.moe_layers * m))
    return lambda _: c


def fitted_edge_ms(points: Sequence[Point], cost_of: Callable[[Point], Callable[[int], LayerCost]]) -> float:
    """The per-edge latency the one-lane runs imply ((measured - compute) / critical edges), their
    median."""
    implied = []
    for p in points:
        if p.lanes == 1:
            compute = step_ms(p.shape, cost_of(p), p.batch, 0.0)
            implied.append((p.median_ms - compute) / (2 * p.shape.moe_layers + 2))
    return statistics.median(implied)


def report(points: Sequence[Point], profile: Profile) -> str:
    """Per point: the step, tokens/s, ms inside each kind of actor, and two predictions with an
    edge fitted on the one-lane runs: from the profile's calibrated times, and from the step
    telemetry of the run itself (the cost model's inputs measured, its pipeline put to the test)."""
    def calibrated(p: Point) -> Callable[[int], LayerCost]:
        return profile.cost

    edges = {"profile": fitted_edge_ms(points, calibrated),
             "telemetry": fitted_edge_ms(points, measured_cost)}
    one = {(p.depth, p.batch): p.median_ms for p in points if p.lanes == 1}
    rows = []
    for p in points:
        inside = p.inside_ms()
        base = one[p.depth, p.batch]
        preds = [step_ms(p.shape, calibrated(p), p.batch, edges["profile"], p.lanes),
                 step_ms(p.shape, measured_cost(p), p.batch, edges["telemetry"], p.lanes)]
        rows.append([p.depth, p.batch, p.lanes, p.median_ms, 1e3 * p.batch / p.median_ms,
                     f"{base / p.median_ms:.2f}×", inside["attention"], inside["deltanet"], inside["experts"],
                     *(x for pred in preds for x in (pred, f"{100 * (pred / p.median_ms - 1):+.0f} %"))])
    head = (f"edge fitted on the one-lane runs: {1e3 * edges['profile']:.0f} µs over the profile's times, "
            f"{1e3 * edges['telemetry']:.0f} µs over the telemetry's\n\n")
    return head + markdown_table(
        ["depth", "batch", "lanes", "step ms", "tokens/s", "vs 1 lane", "attention ms", "deltanet ms",
         "experts ms", "predicted (profile) ms", "error", "predicted (telemetry) ms", "error"], rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--depths", type=int, nargs="+", default=[12, 48])
    ap.add_argument("--batch", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--lanes", type=int, nargs="+", default=[1, 2, 3], help="micro-batches per step")
    ap.add_argument("--profile", choices=["h100-80b", "linear"], default="h100-80b")
    ap.add_argument("--dilate", type=float, default=500.0, help="h100-80b: ms here per ms on an H100")
    ap.add_argument("--mixer-ms", type=float, default=8.0, help="linear: mixer ms per layer at --ref-batch")
    ap.add_argument("--expert-ms", type=float, default=8.0, help="linear: shard ms per layer at --ref-batch")
    ap.add_argument("--ref-batch", type=int, default=32)
    ap.add_argument("--fixed-share", type=float, default=0.0, help="linear: share not depending on tokens")
    ap.add_argument("--repeats", type=int, default=6, help="timed steps per point, over all rounds")
    ap.add_argument("--rounds", type=int, default=2, help="turns the lane counts take")
    ap.add_argument("--poll-us", type=float, default=None, help="cluster.channel_poll_us (default: auto)")
    ap.add_argument("--expert-shards", type=int, default=2)
    ap.add_argument("--data-plane", choices=["sockets", "compiled_graph", "remote_calls"], default="sockets",
                    help="cluster.data_plane")
    ap.add_argument("--nodes", action="store_true",
                    help="a simulated multi-node cluster (ray.cluster_utils.Cluster): a head without CPUs, "
                         "one node for the mixers, one for the expert shards, pools placed by resources")
    args = ap.parse_args(argv)
    if not 0 <= args.fixed_share <= 1:
        ap.error(f"--fixed-share must be in [0, 1], got {args.fixed_share}")
    if any(m < 1 for m in args.lanes) or 1 not in args.lanes:
        ap.error(f"--lanes must be >= 1 and include 1 (the baseline), got {args.lanes}")
    profile = Profile(args.profile, args.dilate, args.mixer_ms, args.expert_ms, args.ref_batch,
                      args.fixed_share)
    torch.set_num_threads(1)
    logging.getLogger("ray.dag").setLevel(logging.WARNING)

    import ray

    import cluster.actors
    from model.tiny import make_tiny_model

    # the actors cluster/actors.py starts are this run's sleepy subclasses
    cluster.actors.MixerWorker, cluster.actors.ExpertWorker = sleepy_classes(profile)
    root = str(Path(__file__).resolve().parents[1])
    env = {"PYTHONPATH": root, "RAY_CGRAPH_buffer_size_bytes": str(BUFFER_BYTES)}
    from ray.dag import DAGContext

    DAGContext.get_current().buffer_size_bytes = BUFFER_BYTES
    nodes = None
    if args.nodes:
        from ray.cluster_utils import Cluster

        nodes = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
        nodes.add_node(num_cpus=2, resources={"mixer_node": 2})
        nodes.add_node(num_cpus=args.expert_shards, resources={"expert_node": args.expert_shards})
        ray.init(address=nodes.address, log_to_driver=False, runtime_env={"env_vars": env})
        nodes.wait_for_nodes()
    else:
        ray.init(address="local", num_cpus=args.expert_shards + 2, include_dashboard=False,
                 log_to_driver=False, runtime_env={"env_vars": env})
    points: list[Point] = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for d in args.depths:
                model_dir = str(make_tiny_model(Path(tmp) / f"d{d}", overrides={"num_hidden_layers": d}))
                t0 = time.perf_counter()
                done = run_depth(model_dir, d, args.batch, args.lanes, args.repeats, args.rounds,
                                 args.poll_us, args.expert_shards, args.nodes, args.data_plane)
                points += done
                print(f"depth {d}: {time.perf_counter() - t0:.0f} s; so far:\n{report(done, profile)}",
                      flush=True)
    finally:
        ray.shutdown()
        if nodes is not None:
            nodes.shutdown()
    print(f"\n### {profile.describe()}; {args.expert_shards} expert shards; median ms per decode step over "
          f"{args.repeats} steps\n")
    print(report(points, profile))

if __name__ == "__main__":
    main()
