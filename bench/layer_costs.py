"""Where a cluster actor's time goes per layer, without Ray: the cluster's own actor classes with
compiled decode (`engine.compile`), called in step order in this process (bench/cluster_step.py's
`in-process`), each piece of a call timed by wrapping it. Prints µs per call (median) and per
layer (all calls of a step / layers) for a decode step of `--batch` sequences on DEEP48
(1 attention + 1 DeltaNet mixer, 2 expert shards).

    .venv/bin/python -m bench.layer_costs --batch 32

Pieces that the code under test lacks are left out, so the same script times an older tree
(`PYTHONPATH=OLD_TREE .venv/bin/python NEW_TREE/bench/layer_costs.py`). Nested pieces are inside
their callers' time (`CompiledLayers()` inside `mixer.run`); `mixer.run − CompiledLayers()` is the
eager work around the compiled layer. Called in a tight loop, every piece is 1.5–3× faster than
here, where 48 layers' weights and code take turns in the caches as in an actor."""

from __future__ import annotations

import argparse
import functools
import importlib
import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

# (module, attribute path, label): what is timed, where it exists
PIECES = [
    ("cluster.workers", "MixerWorker.run", "mixer.run"),
    ("model.compiled_actor", "CompiledLayers.__call__", "CompiledLayers()"),
    ("cluster.workers", "MixerWorker._resume", "mixer._resume (combine in)"),
    ("router.dispatch", "Router.plan", "router.plan"),
    ("cluster.workers", "_Unsent.count", "pairs per expert (_Unsent.count)"),
    ("cluster.workers", "MixerWorker._telemetry", "mixer._telemetry"),
    ("cluster.workers", "count_pairs", "count_pairs"),
    ("cluster.workers", "to_wire", "to_wire"),
    ("cluster.workers", "from_wire", "from_wire"),
    ("cluster.messages", "Telemetry.add", "Telemetry.add"),
    ("cluster.workers", "ExpertWorker.run", "shard.run"),
    ("model.compiled_actor", "CompiledExperts.__call__", "CompiledExperts()"),
    ("cluster.wire", "encode", "wire.encode (pickle)"),
]


def _wrap(owner: Any, name: str, label: str, acc: dict[str, list[float]]) -> None:
    f = getattr(owner, name)

    @functools.wraps(f)
    def timed(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return f(*args, **kwargs)
        finally:
            acc.setdefault(label, []).append(time.perf_counter() - t0)

    setattr(owner, name, timed)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=20, help="timed decode steps (after 3 untimed)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    acc: dict[str, list[float]] = {}
    for module, path, label in PIECES:
        owner: Any = importlib.import_module(module)
        *parents, name = path.split(".")
        for p in parents:
            owner = getattr(owner, p, None)
        if owner is not None and hasattr(owner, name):
            _wrap(owner, name, label, acc)
    from bench.cluster_step import DEEP48, MAX_MODEL_LEN, decode_step
    from cluster.config import Pools
    from cluster.messages import StepMsg
    from cluster.placement import resolve_placement
    from cluster.step_graph import wire_lanes
    from cluster.wire import encode
    from cluster.workers import ExpertWorker, MixerWorker
    from model.config import ModelConfig
    from model.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        d = str(make_tiny_model(Path(tmp) / "deep48", overrides=DEEP48))
        config = ModelConfig.from_dir(d, dtype="float32")
        placement = resolve_placement(Pools.model_validate({"experts": {"actors": 2}}), config)
        slots = args.batch
        mixers = [MixerWorker(d, "float32", spec, slots, MAX_MODEL_LEN, placement.experts, compile=True)
                  for spec in placement.mixers]
        shards = [ExpertWorker(d, "float32", s, ids, compile_rows=slots)
                  for s, ids in enumerate(placement.experts.shards)]
    for m in mixers:
        m.warm_up(next(b for b in m.decode.buckets if b >= args.batch))
    for s in shards:
        s.warm_up()

    def call(actor: Any, method: str, num_returns: int, *a: Any) -> Any:
        out = getattr(actor, method)(*a)
        if method == "run" and actor in shards:  # what the sockets plane pickles: every shard's answer,
            encode(1, (0, 0), 0, out)           # each mixer's ShardWork (once) and the Carry that leaves
        elif method == "run":
            c = placement.owner
            outs = out if isinstance(out, tuple) else (out,)
            layer = a[0]
            if layer + 1 < len(c) and c[layer + 1] != c[layer]:
                encode(1, (0, 0), 0, outs[0])
            for w in dict.fromkeys(id(o) for o in outs[1:]):
                encode(1, (0, 0), 0, next(o for o in outs[1:] if id(o) == w))
        return out

    seq, step = itertools.count(), decode_step(args.batch)
    for i in range(3 + args.steps):
        if i == 3:
            acc.clear()
        wire_lanes(call, [StepMsg(next(seq), step)], config, placement, mixers, shards)
    layers = config.num_hidden_layers
    print(f"DEEP48, batch {args.batch}, {args.steps} decode steps, compiled actors in one process")
    print("| piece | calls per step | µs per call (median) | µs per layer |")
    print("|---|---:|---:|---:|")
    for label, times in sorted(acc.items(), key=lambda kv: -sum(kv[1])):
        print(f"| {label} | {len(times) / args.steps:.0f} | {1e6 * statistics.median(times):.0f} | "
              f"{1e6 * sum(times) / args.steps / layers:.0f} |")


if __name__ == "__main__":
    main()
