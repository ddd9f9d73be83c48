"""Decode step time of the cluster executor (sockets data plane, compiled graph, plain remote calls)
against the local executor in the same run, on the tiny and a wider Qwen3-Next, with where each
step's time goes;
and the per-hop latency of a compiled graph against plain actor calls. Prints markdown tables.

    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m bench.cluster_step \\
        --models tiny wide --batch 1 8 32 128'

Ray starts here (address="local"): run it in a loopback-only network namespace as above. Every
process computes with one torch thread. The modes take turns (--rounds), so load from other work
on the machine falls on all of them alike; while local or in-process runs, the cluster sits on
plain remote calls, since idle compiled-graph actors busy-wait on their channels. `in-process`
calls the cluster's own actor classes in step order in this process, wired by the step graph's
code: the cost of taking the model apart, without Ray. Time inside actors comes from the cluster
executor's step telemetry; "outside actors" is the rest of a step: hops, (de)serialising, and
waiting for a core."""

from __future__ import annotations

import argparse
import itertools
import logging
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.executor import StepInput

POSITION = 32  # every sequence of a decode step is at this position, so caches stay small
MAX_MODEL_LEN = 64
TIMEOUT_S = 120.0
HOP_REPEATS = 100
# 4 layers (3 DeltaNet + 1 attention), hidden 1024, 64 experts top-8 of 256, a shared expert of 256:
# Qwen3-Next's shape (hidden 2048, 512 experts top-10 of 512), narrowed to run in minutes here.
WIDE: dict[str, Any] = dict(
    hidden_size=1024, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
    linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64, linear_value_head_dim=64,
    num_experts=64, num_experts_per_tok=8, moe_intermediate_size=256, shared_expert_intermediate_size=256,
    intermediate_size=1024, num_hidden_layers=4, full_attention_interval=4,
)
# name -> settings for ClusterExecutor.configure_step; None: not the cluster executor
MODES: dict[str, dict[str, Any] | None] = {
    "local": None,
    "in-process": None,
    # polling channel reads with the 2-core default cap; -spin: Ray's busy wait
    "compiled": dict(data_plane="compiled_graph", micro_batch_tokens=0, channel_poll_us=200.0),
    "compiled-spin": dict(data_plane="compiled_graph", micro_batch_tokens=0, channel_poll_us=0),
    "compiled-poll50": dict(data_plane="compiled_graph", micro_batch_tokens=0, channel_poll_us=50),
    "compiled-poll1000": dict(data_plane="compiled_graph", micro_batch_tokens=0, channel_poll_us=1000),
    "remote": dict(data_plane="remote_calls", micro_batch_tokens=0),
    "compiled-2lane": dict(data_plane="compiled_graph", micro_batch_tokens=16, channel_poll_us=200.0),
    "remote-2mb": dict(data_plane="remote_calls", micro_batch_tokens=16),
    "sockets": dict(data_plane="sockets", micro_batch_tokens=0),  # the default data plane
    "sockets-2lane": dict(data_plane="sockets", micro_batch_tokens=16),
    # engine.compile: a second cluster whose mixers run decode layers compiled (model/compiled_actor.py
    # CompiledLayers) over the default data plane, and the local executor's compiled step
    "compiled-actors": dict(data_plane="sockets", micro_batch_tokens=0),
    "local-compiled": None,
}
ACTOR_COMPILE_MODES = {"compiled-actors"}
# Qwen3-Next's depth and 3:1 layer pattern at the tiny width (issue 13's 48-layer narrow model)
DEEP48: dict[str, Any] = dict(num_hidden_layers=48)


def decode_step(batch: int) -> StepInput:
    """One decode token for each of `batch` sequences in slots 0..batch-1, all at POSITION."""
    g = torch.Generator().manual_seed(batch)
    tokens = tuple(torch.randint(2, 300, (batch,), generator=g).tolist())
    return StepInput(tokens, tuple(range(batch)), (POSITION,) * batch, (1,) * batch, tuple(range(batch)))


def step_times(executor: Any, step: StepInput, repeats: int) -> tuple[list[float], list[dict[str, float]]]:
    """Seconds of `repeats` steps after two warm-up steps, and where the executor can tell, each
    step's ms inside actors by kind (`actor_ms`)."""
    for _ in range(2):
        executor.execute(step)
    actor_ms(executor)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        executor.execute(step)
        times.append(time.perf_counter() - t0)
    return times, actor_ms(executor)


def actor_ms(executor: Any) -> list[dict[str, float]]:
    """Per step since the last call: ms inside attention, DeltaNet and expert actors. Expert
    shards of the cluster run side by side, so its `experts` is the slowest shard's; in-process
    they run one after the other and it is their sum. [] for the local executor."""
    if isinstance(executor, InProcessActors):
        return executor.take_steps()
    out = []
    for t in getattr(executor, "take_step_telemetry", list)():  # the cluster executor's, if it has one
        kinds: dict[str, float] = defaultdict(float)
        shards = [0.0]
        for kind, s in t.actor_seconds:
            if kind == "experts":
                shards.append(1e3 * s)
            else:
                kinds[kind] += 1e3 * s
        out.append({**kinds, "experts": max(shards)})
    return out


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Right-aligned columns after the first; floats with 1 decimal (2 below 10), ratios as given."""
    def cell(v: Any) -> str:
        if not isinstance(v, float):
            return str(v)
        return f"{v:.2f}" if abs(v) < 10 else f"{v:.1f}"
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class InProcessActors:
    """The cluster's actor classes as plain objects in this process; a step is wired by the step
    graph's own `wire_lanes` (one lane) and each call made as soon as it is wired, which is a valid
    order. Records each step's ms in each kind of actor (attention, deltanet, experts)."""

    def __init__(self, model_dir: str, placement: Any, num_slots: int, max_model_len: int) -> None:
        from cluster.workers import ExpertWorker, MixerWorker
        from model.config import ModelConfig

        self.config = ModelConfig.from_dir(model_dir, dtype="float32")
        self.placement = placement
        self.mixers = [MixerWorker(model_dir, "float32", spec, num_slots, max_model_len, placement.experts)
                       for spec in placement.mixers]
        self.shards = [ExpertWorker(model_dir, "float32", s, ids)
                       for s, ids in enumerate(placement.experts.shards)]
        self.steps: list[dict[str, float]] = []
        self._seq = itertools.count()

    def _call(self, actor: Any, method: str, num_returns: int, *args: Any) -> Any:
        t0 = time.perf_counter()
        out = getattr(actor, method)(*args)
        kind = actor.spec.pool if hasattr(actor, "spec") else "experts"
        self.steps[-1][kind] = self.steps[-1].get(kind, 0.0) + 1e3 * (time.perf_counter() - t0)
        return out

    def execute(self, step: StepInput) -> torch.Tensor:
        from cluster.messages import StepMsg
        from cluster.step_graph import wire_lanes

        self.steps.append({})
        msg = StepMsg(next(self._seq), step)
        [result] = wire_lanes(self._call, [msg], self.config, self.placement, self.mixers, self.shards)
        return torch.from_numpy(result.logits)

    def take_steps(self) -> list[dict[str, float]]:
        out, self.steps = self.steps, []
        return out


class Hop:
    """A trivial actor: passes its input on."""

    def __init__(self) -> None:
        torch.set_num_threads(1)

    def ready(self) -> bool:
        return True

    def forward(self, x: Any) -> Any:
        return x


def hop_latency(actors: Sequence[Any], payload: Any, repeats: int) -> tuple[float, float]:
    """Median ms per hop through a chain of Hop `actors` (len(actors) + 1 hops, driver to driver):
    (compiled graph, plain `.remote()` calls with ObjectRefs passed actor to actor)."""
    import ray
    from ray.dag import InputNode

    with InputNode() as inp:
        node = inp
        for a in actors:
            node = a.forward.bind(node)
    graph = node.experimental_compile(_submit_timeout=TIMEOUT_S)
    try:
        def compiled() -> None:
            ray.get(graph.execute(payload), timeout=TIMEOUT_S)
        t_compiled = _median_s(compiled, repeats)
    finally:
        graph.teardown()

    def remote() -> None:
        ref = payload
        for a in actors:
            ref = a.forward.remote(ref)
        ray.get(ref, timeout=TIMEOUT_S)
    t_remote = _median_s(remote, repeats)
    return 1e3 * t_compiled / (len(actors) + 1), 1e3 * t_remote / (len(actors) + 1)


def _median_s(fn: Any, repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Timings:
    """One (mode, batch): step seconds, and per step the ms inside each kind of actor ([]: unknown)."""

    steps: list[float] = field(default_factory=list)
    actors: list[dict[str, float]] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.steps)


def bench_model(model_dir: str, batches: Sequence[int], modes: Sequence[str], repeats: int, rounds: int,
                expert_shards: int) -> dict[tuple[str, int], Timings]:
    """Timings by (mode, batch); the modes take `rounds` turns. Ray must be up for the cluster's
    modes (local and in-process need none)."""
    from cluster.executor import ClusterExecutor
    from cluster.placement import resolve_placement
    from deployments.config import NextserveConfig
    from engine.local_executor import LocalExecutor
    from model.config import ModelConfig

    slots = max(batches)
    executors: dict[str, Any] = {}
    # timeout_s: a mixer compiling a bucket (compiled-actors) on a busy machine takes minutes
    config = NextserveConfig.from_args({"pools": {"experts": {"actors": expert_shards}},
                                        "cluster": {"timeout_s": 900}})
    clusters: dict[bool, Any] = {}  # actors compiled -> the cluster
    try:
        for compile in (False, True):
            if any(MODES[m] is not None and (m in ACTOR_COMPILE_MODES) == compile for m in modes):
                clusters[compile] = ClusterExecutor(model_dir, dtype="float32", num_slots=slots,
                                                    max_model_len=MAX_MODEL_LEN, config=config,
                                                    compile=compile)
        for mode, compile in (("local", False), ("local-compiled", True)):
            if mode in modes:
                executors[mode] = LocalExecutor(model_dir, dtype="float32", num_slots=slots,
                                                max_model_len=MAX_MODEL_LEN, compile=compile)
        if "in-process" in modes:
            placement = resolve_placement(config.pools, ModelConfig.from_dir(model_dir, dtype="float32"))
            executors["in-process"] = InProcessActors(model_dir, placement, slots, MAX_MODEL_LEN)
        out: dict[tuple[str, int], Timings] = defaultdict(Timings)
        for _ in range(rounds):
            for mode in modes:
                active = clusters.get(mode in ACTOR_COMPILE_MODES) if MODES[mode] is not None else None
                executor = executors.get(mode, active)
                for cluster in clusters.values():
                    # Idle actors of a compiled graph busy-wait on their input channels (~0.5
                    # core each here): plain remote calls while another mode runs.
                    cluster.configure_step(**(MODES[mode] if cluster is active else MODES["remote"]))
                for b in batches:
                    steps, actors = step_times(executor, decode_step(b), max(1, repeats // rounds))
                    out[mode, b].steps += steps
                    out[mode, b].actors += actors if len(actors) == len(steps) else []
        return dict(out)
    finally:
        for cluster in clusters.values():
            cluster.shutdown()


def step_table(t: dict[tuple[str, int], Timings], batches: Sequence[int], modes: Sequence[str]) -> str:
    ratios = [m for m in modes if m != "local"] if "local" in modes else []
    header = ["batch", *(f"{m} ms" for m in modes), *(f"{m} / local" for m in ratios)]
    rows = [[b, *(t[m, b].median_ms for m in modes),
             *(f"{t[m, b].median_ms / t['local', b].median_ms:.2f}×" for m in ratios)] for b in batches]
    return markdown_table(header, rows)


def actor_table(t: dict[tuple[str, int], Timings], batches: Sequence[int], modes: Sequence[str]) -> str:
    """Medians per step: step time, ms inside each kind of actor, and the rest (hops, serialising,
    waiting for a core), for the modes that report their actors."""
    kinds = ("attention", "deltanet", "experts")
    rows = []
    for b in batches:
        for m in modes:
            x = t[m, b]
            if not x.actors:
                continue
            rest = [1e3 * s - sum(a.values()) for s, a in zip(x.steps, x.actors, strict=True)]
            inside = [statistics.median(a.get(k, 0.0) for a in x.actors) for k in kinds]
            rows.append([b, m, x.median_ms, *inside, statistics.median(rest)])
    return markdown_table(["batch", "mode", "step ms", *(f"{k} ms" for k in kinds), "outside actors ms"],
                          rows)


def hop_table(widths: Sequence[int], num_actors: int, repeats: int) -> str:
    import ray

    actors = [ray.remote(num_cpus=0)(Hop).remote() for _ in range(num_actors)]
    try:
        ray.get([a.ready.remote() for a in actors], timeout=TIMEOUT_S)
        rows = []
        for H in widths:
            x = np.random.default_rng(0).standard_normal((16, H), dtype=np.float32)
            for name, payload in (("numpy", x), ("torch", torch.from_numpy(x))):
                compiled, remote = hop_latency(actors, payload, repeats)
                rows.append([f"[16, {H}] float32 {name}", compiled, remote, f"{remote / compiled:.2f}×"])
    finally:
        for a in actors:
            ray.kill(a)
    return markdown_table(["payload", "compiled ms/hop", "remote ms/hop", "remote / compiled"], rows)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["tiny", "wide"], choices=["tiny", "wide", "deep48"],
                    help="built-in checkpoints made here: tiny, wide (WIDE's sizes), deep48 (the tiny one "
                         "48 layers deep)")
    ap.add_argument("--model", help="a checkpoint directory instead of --models")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128])
    ap.add_argument("--modes", nargs="+", default=["local", "in-process", "compiled", "remote"],
                    choices=list(MODES))
    ap.add_argument("--repeats", type=int, default=15, help="timed steps per (mode, batch), over all rounds")
    ap.add_argument("--rounds", type=int, default=5, help="turns the modes take")
    ap.add_argument("--expert-shards", type=int, default=2)
    ap.add_argument("--hop-actors", type=int, default=8, help="actors in the per-hop chain (0: skip it)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("ray.dag").setLevel(logging.WARNING)  # an INFO line per actor at each teardown

    import ray

    from model.config import ModelConfig
    from model.tiny import make_tiny_model

    root = str(Path(__file__).resolve().parents[1])
    # CPUs for the clusters' actors only (Ray starts as many idle workers at once): one cluster with
    # eager actors, one with compiled ones, or both
    clusters = len({m in ACTOR_COMPILE_MODES for m in args.modes if MODES[m] is not None})
    ray.init(address="local", num_cpus=clusters * (args.expert_shards + 2), include_dashboard=False,
             log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": root}})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            dirs = {args.model: args.model} if args.model else {
                m: str(make_tiny_model(Path(tmp) / m, overrides={"wide": WIDE, "deep48": DEEP48}.get(m)))
                for m in args.models}
            widths = []
            for name, model_dir in dirs.items():
                c = ModelConfig.from_dir(model_dir)
                widths.append(c.hidden_size)
                print(f"\n### {name}: hidden {c.hidden_size}, {c.num_hidden_layers} layers, {c.num_experts} "
                      f"experts top-{c.num_experts_per_tok}, {args.expert_shards} expert shards; median ms "
                      f"per decode step (position {POSITION}) over {args.repeats} steps", flush=True)
                t = bench_model(model_dir, args.batch, args.modes, args.repeats, args.rounds,
                                args.expert_shards)
                print(step_table(t, args.batch, args.modes), flush=True)
                print(f"\n{name}, median ms per step inside actors (experts: the slowest shard, all "
                      f"shards in-process) and outside them:")
                print(actor_table(t, args.batch, args.modes), flush=True)
            if args.hop_actors > 0:
                print(f"\n### per hop: chain of {args.hop_actors} trivial actors, driver to driver "
                      f"({args.hop_actors + 1} hops), median over {HOP_REPEATS}", flush=True)
                print(hop_table(sorted(set(widths)), args.hop_actors, HOP_REPEATS), flush=True)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
