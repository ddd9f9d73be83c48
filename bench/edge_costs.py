"""Where one graph edge of the cluster's step goes: the edges a step crosses (from the placement),
the µs to serialise and deserialise each kind of message at its real size (pickle protocol 5 with
out-of-band buffers, as Ray's channels do), by batch and by layer depth; and the µs of a whole edge
of the sockets data plane (cluster/wire.py: framing, a Unix socket, the reader's wake-up from a
blocking recv): half a round trip to a process that sends each frame back. No Ray needed.

    .venv/bin/python -m bench.edge_costs --layers 48 --batch 1 32

The rest of a compiled-graph edge (channel write, the reader's wake-up, cores taken by actors that
busy-wait on their channels) is what bench/cluster_step.py's "outside actors" leaves after these."""

from __future__ import annotations

import argparse
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from bench.cluster_step import decode_step, markdown_table

REPEATS = 2000
SOCKET_REPEATS = 500


def roundtrip_us(value: Any, repeats: int = REPEATS) -> tuple[float, int]:
    """Median µs to pickle `value` (numpy buffers out of band) and load it back; its pickled bytes."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buffers: list[pickle.PickleBuffer] = []
        data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
        pickle.loads(data, buffers=buffers)
        times.append(time.perf_counter() - t0)
    return 1e6 * float(np.median(times)), len(data) + sum(b.raw().nbytes for b in buffers)


def socket_edge_us(value: Any, repeats: int = SOCKET_REPEATS) -> float:
    """Median µs of one sockets data-plane edge carrying `value`: a frame to a forked echo process
    over a Unix socket and back (cluster/wire.py's framing both ways), halved."""
    import os
    import socket

    from cluster.wire import DATA, recv_frame, send_frame

    a, b = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the echo: receive, send the same value back, until the socket closes
        a.close()
        try:
            while True:
                f = recv_frame(b)
                send_frame(b, DATA, f.key, f.step, f.value)
        except (EOFError, OSError):
            os._exit(0)
    b.close()
    try:
        times = []
        for i in range(repeats + 20):
            t0 = time.perf_counter()
            send_frame(a, DATA, (1, 0), i, value)
            recv_frame(a)
            if i >= 20:
                times.append(time.perf_counter() - t0)
    finally:
        a.close()
        os.waitpid(pid, 0)
    return 1e6 * float(np.median(times)) / 2


def step_edges(model: Any, placement: Any) -> dict[str, int]:
    """Edges one lane of a step crosses between processes, by kind (an actor calling itself is an
    in-process channel and not counted): carry mixer→mixer, work mixer→shard, result shard→mixer."""
    edges = {"carry": 0, "work": 0, "result": 0}
    prev, shards_in = None, False
    for layer in range(model.num_hidden_layers):
        owner = placement.owner[layer]
        if prev is not None and owner != prev:
            edges["carry"] += 1
        if shards_in:
            edges["result"] += placement.num_shards
        shards_in = model.is_moe_layer(layer)
        edges["work"] += placement.num_shards if shards_in else 0
        prev = owner
    if shards_in:
        edges["result"] += placement.num_shards
    return edges


def messages(model: Any, step: Any, layer: int, num_shards: int) -> dict[str, Any]:
    """The messages of a MoE layer `layer` at `step`'s size, as cluster/workers.py builds them."""
    from cluster.messages import Carry, ShardResult, ShardWork, StepMsg, Telemetry, count_pairs

    T, H, k = len(step.token_ids), model.hidden_size, model.num_experts_per_tok
    n = max(1, T * k // num_shards)  # rows per shard, about
    rng = np.random.default_rng(0)
    h = rng.standard_normal((T, H), dtype=np.float32)
    rows = tuple(np.arange(n, dtype=np.int64) % T for _ in range(num_shards))
    telemetry = Telemetry({"deltanet-0": 1e-3, "attention-0": 1e-3, "experts-0": 1e-3, "experts-1": 1e-3})
    # the form before issue 14: one [E] array per MoE layer so far
    counts = {m: np.zeros(model.num_experts, np.int64) for m in model.moe_layers if m <= layer}
    one = count_pairs(None, len(model.moe_layers), model.moe_layers.index(layer), np.zeros(model.num_experts))
    return {
        "StepMsg (input)": StepMsg(0, step),
        "Carry, counts as a dict (before)": Carry(h, h.copy(), rows, counts, telemetry),  # type: ignore[arg-type]
        "Carry, counts as one [M, E] array": Carry(h, h.copy(), rows, one, telemetry),
        "ShardWork": ShardWork(layer, rng.standard_normal((n, H), dtype=np.float32),
                               np.zeros((n, k), np.int64), np.zeros((n, k), np.float32)),
        "ShardResult": ShardResult(rng.standard_normal((n, H), dtype=np.float32), 1e-3),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--expert-shards", type=int, default=2)
    args = ap.parse_args(argv)

    from cluster.placement import resolve_placement
    from deployments.config import NextserveConfig
    from model.config import ModelConfig
    from model.tiny import make_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        model = ModelConfig.from_dir(str(make_tiny_model(Path(tmp) / "m",
                                                         overrides={"num_hidden_layers": args.layers})))
    config = NextserveConfig.from_args({"pools": {"experts": {"actors": args.expert_shards}}})
    placement = resolve_placement(config.pools, model)
    edges = step_edges(model, placement)
    print(f"edges per step and lane between processes ({args.layers} layers, {args.expert_shards} shards): "
          f"{edges}, {sum(edges.values())} in all, +2 driver edges")
    rows = []
    for b in args.batch:
        step = decode_step(b)
        for layer in sorted({model.moe_layers[0], model.moe_layers[len(model.moe_layers) // 2],
                             model.moe_layers[-1]}):
            for name, msg in messages(model, step, layer, args.expert_shards).items():
                us, nbytes = roundtrip_us(msg)
                rows.append([b, layer, name, nbytes, us, socket_edge_us(msg)])
    print(markdown_table(["batch", "layer", "message", "bytes", "pickle + unpickle µs",
                          "sockets edge µs"], rows))


if __name__ == "__main__":
    main()
