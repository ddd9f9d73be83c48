"""The cluster's actor classes with `compile` (cluster/workers.py, model/compiled_actor.py CompiledLayers),
called in step order in this process (no Ray; tests/cluster/test_cluster_compile.py runs them as
actors): a mixer runs each decode layer compiled, padded up to its batch bucket (3 rows in the
bucket of 4: the padded row on the scratch slot and block), other steps eagerly. Logits within the
README's compiled tolerance of the local executor's eager ones and the same greedy tokens, both
architectures; an expert shard runs calls of at most one row per slot compiled (the routed rows,
a dynamic dimension), larger ones eagerly. `warm_up` makes every graph a bucket needs, on scratch
rows only, so that the steps after it compile nothing."""

from __future__ import annotations

import itertools
import platform

import pytest
import torch

import cluster.workers
from cluster.config import Pools
from cluster.messages import StepMsg
from cluster.placement import resolve_placement
from cluster.step_graph import wire_lanes
from cluster.workers import ExpertWorker, MixerWorker
from engine.executor import StepInput
from engine.local_executor import LocalExecutor
from model.config import ModelConfig

SLOTS, MAX_LEN, BLOCK = 4, 64, 8


def steps() -> list[StepInput]:
    """Shuffled block tables; every decode step has 3 or 4 sequences (the bucket of 4)."""
    g = torch.Generator().manual_seed(0)
    blocks = torch.randperm(32, generator=g).tolist()
    tables = {s: tuple(blocks[8 * s:8 * s + 8]) for s in range(4)}

    def step(slots, starts, lengths):
        ends = [sum(lengths[:i + 1]) - 1 for i in range(len(slots))]
        tokens = tuple(torch.randint(2, 384, (sum(lengths),), generator=g).tolist())
        return StepInput(tokens, tuple(slots), tuple(starts), tuple(lengths), tuple(ends),
                         block_tables=tuple(tables[s] for s in slots))

    return [
        step((0, 1, 2), (0, 0, 0), (7, 4, 20)),  # prefill (eager)
        step((0, 1, 2), (7, 4, 20), (1, 1, 1)),  # decode: 3 rows padded to 4
        step((0, 1, 2), (8, 5, 21), (1, 1, 1)),
        step((2, 1, 0, 3), (22, 6, 9, 0), (1, 1, 1, 1)),  # a one-token prompt in slot 3: a full bucket
        step((1, 3), (7, 1), (1, 6)),  # mixed (eager)
        step((3, 0, 2), (7, 10, 23), (1, 1, 1)),  # keys across the KV granule (16) for slot 2
        step((3, 0, 2), (8, 11, 24), (1, 1, 1)),
    ]


def assert_close_logits(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """The README's compiled tolerance, 1e-4 x max|logit|, and the same greedy tokens."""
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * float(want.abs().max()),
                               msg=lambda m: f"{what}: {m}")
    assert torch.equal(got.argmax(-1), want.argmax(-1)), what


@pytest.mark.parametrize("all_rows", [True, False])
def test_compiled_mixers_match_the_local_eager_executor(hf_dir, all_rows, monkeypatch):
    """The router sends each of the 2 shards either all rows (router/dispatch.py all_rows, chosen
    here by its threshold) or its own rows. The step's pairs per expert, counted once per visit
    of a mixer, are the local executor's."""
    monkeypatch.setattr("router.dispatch.ALL_ROWS_SHARE", 0.0 if all_rows else 1.01)
    config = ModelConfig.from_dir(hf_dir, dtype="float32")
    placement = resolve_placement(Pools.model_validate({"experts": {"actors": 2}}), config)
    mixers = [MixerWorker(hf_dir, "float32", spec, SLOTS, MAX_LEN, placement.experts, block_size=BLOCK,
                          num_kv_blocks=32, compile=True) for spec in placement.mixers]
    workers = [ExpertWorker(hf_dir, "float32", s, ids, compile_rows=SLOTS)
               for s, ids in enumerate(placement.experts.shards)]
    local = LocalExecutor(hf_dir, dtype="float32", num_slots=SLOTS, max_model_len=MAX_LEN, block_size=BLOCK,
                          num_kv_blocks=32)
    assert all(m.decode is not None and m.decode.buckets == (1, 2, 4) for m in mixers)

    for m in mixers:  # one graph per kind of layer here, made on scratch rows
        kinds = {(type(layer.mixer).__name__, type(layer.mlp).__name__) for layer in m.layers.values()}
        assert set(m.warm_up(4)) == {f"4/{a}/{b}" for a, b in kinds}
    assert all(set(s.warm_up()) == {"experts"} for s in workers)  # one graph for 1 to SLOTS rows
    compiled = [dict(w.decode.compiles.seconds) for w in (*mixers, *workers)]

    def call(actor, method, num_returns, *args):
        return getattr(actor, method)(*args)

    assert all(m.router.all_rows == all_rows for m in mixers)
    seq = itertools.count()
    counts: dict[int, list[int]] = {}
    for i, step in enumerate(steps()):
        want = local.execute(step)
        [result] = wire_lanes(call, [StepMsg(next(seq), step)], config, placement, mixers, workers)
        assert_close_logits(torch.from_numpy(result.logits), want, f"step {i}")
        assert set(result.counts) == set(config.moe_layers)
        for layer, c in result.counts.items():
            assert int(c.sum()) == len(step.token_ids) * config.num_experts_per_tok, (i, layer)
            counts[layer] = [a + b for a, b in zip(counts.get(layer, [0] * len(c)), c.tolist(), strict=True)]
        assert {name for name, _ in result.telemetry.seconds.items()} == {
            *(m.spec.name for m in mixers), *(f"experts-{s}" for s in range(len(workers)))}
    assert counts == local.take_expert_counts()
    assert [w.decode.compiles.seconds for w in (*mixers, *workers)] == compiled  # none inside a step


def denormal_product() -> float:
    return float(torch.tensor([1e-20]) * torch.tensor([1e-20]))  # 1e-40: a denormal unless flushed


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="flush-to-zero: an x86 SSE setting")
def test_workers_flush_denormals_during_each_call(hf_dir, monkeypatch):
    """As the local executor (engine/cpu_runtime.py): each mixer and shard call on CPU computes
    with denormals flushed in its thread (an actor's calls may run in any of its threads), so the
    two executors compute the same numbers, and leaves the thread's setting as it found it."""
    config = ModelConfig.from_dir(hf_dir, dtype="float32")
    placement = resolve_placement(Pools.model_validate({"experts": {"actors": 2}}), config)
    mixers = [MixerWorker(hf_dir, "float32", spec, SLOTS, MAX_LEN, placement.experts, block_size=BLOCK,
                          num_kv_blocks=32) for spec in placement.mixers]
    workers = [ExpertWorker(hf_dir, "float32", s, ids) for s, ids in enumerate(placement.experts.shards)]
    inside: dict[str, list[float]] = {"MixerWorker": [], "ExpertWorker": []}
    after: list[float] = []
    current = [""]
    real_from_wire = cluster.workers.from_wire

    def from_wire(*args, **kwargs):  # called by both kinds of worker inside their calls
        inside[current[0]].append(denormal_product())
        return real_from_wire(*args, **kwargs)

    monkeypatch.setattr(cluster.workers, "from_wire", from_wire)

    def call(actor, method, num_returns, *args):
        current[0] = type(actor).__name__
        out = getattr(actor, method)(*args)
        after.append(denormal_product())
        return out

    wire_lanes(call, [StepMsg(0, steps()[0])], config, placement, mixers, workers)
    assert inside["MixerWorker"] and inside["ExpertWorker"], inside  # the step ran through both
    assert set(inside["MixerWorker"]) == set(inside["ExpertWorker"]) == {0.0}, inside
    assert min(after) > 0, after  # IEEE subnormals again between the calls
