"""bench/cluster_step.py on tiny cases: its table code, the in-process actors against the local
executor, the step measurements without Ray, and the per-hop latency through Ray actors.

The last test starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest tests/bench -q'"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from bench.cluster_step import (
    POSITION,
    InProcessActors,
    Timings,
    actor_table,
    bench_model,
    decode_step,
    markdown_table,
    step_table,
)
from cluster.placement import resolve_placement
from deployments.config import NextserveConfig
from engine.local_executor import LocalExecutor
from model.config import ModelConfig
from model.tiny import make_tiny_model

ROOT = str(Path(__file__).resolve().parents[2])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "tiny"))


def test_decode_step_is_one_token_per_sequence_at_the_same_position():
    s = decode_step(8)
    assert s.slots == tuple(range(8)) and s.starts == (POSITION,) * 8 and s.lengths == (1,) * 8
    assert s.logits_index == tuple(range(8)) and s == decode_step(8)


def test_tables():
    assert markdown_table(["a", "b", "c"], [[1, 2.345, 12.34], ["x", "1.5×", 0.5]]).splitlines() == [
        "| a | b | c |", "|---|---:|---:|", "| 1 | 2.35 | 12.3 |", "| x | 1.5× | 0.50 |"]
    t = {("local", 1): Timings([0.010, 0.012, 0.011]),
         ("compiled", 1): Timings([0.03, 0.02, 0.04], [{"deltanet": 5.0, "experts": 2.0}] * 3)}
    assert step_table(t, [1], ["local", "compiled"]).splitlines()[-1] == "| 1 | 11.0 | 30.0 | 2.73× |"
    assert actor_table(t, [1], ["local", "compiled"]).splitlines()[2:] == [
        "| 1 | compiled | 30.0 | 0.00 | 5.00 | 2.00 | 23.0 |"]


def test_in_process_actors_give_the_local_logits(tiny):
    config = ModelConfig.from_dir(tiny, dtype="float32")
    pools = NextserveConfig.from_args({"pools": {"experts": {"actors": 2}}}).pools
    actors = InProcessActors(tiny, resolve_placement(pools, config), num_slots=4, max_model_len=64)
    local = LocalExecutor(tiny, dtype="float32", num_slots=4, max_model_len=64)
    for _ in range(2):  # the second step reads the DeltaNet state and KV the first one wrote
        got, want = actors.execute(decode_step(4)), local.execute(decode_step(4))
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    steps = actors.take_steps()
    assert len(steps) == 2 and set(steps[0]) == {"attention", "deltanet", "experts"} and not actors.steps


def test_bench_model_without_ray(tiny):
    t = bench_model(tiny, [1, 2], ["local", "in-process"], repeats=2, rounds=2, expert_shards=2)
    assert sorted(t) == sorted((m, b) for m in ("local", "in-process") for b in (1, 2))
    assert all(len(x.steps) == 2 and x.median_ms > 0 for x in t.values())
    assert len(t["in-process", 2].actors) == 2 and not t["local", 2].actors
    assert step_table(t, [1, 2], ["local", "in-process"]).splitlines()[0] == (
        "| batch | local ms | in-process ms | in-process / local |")
    rows = actor_table(t, [1, 2], ["local", "in-process"]).splitlines()[2:]
    assert [r.split(" | ")[:2] for r in rows] == [["| 1", "in-process"], ["| 2", "in-process"]]


def test_hop_latency_through_actors():
    """Starts Ray (see the module docstring)."""
    ray = pytest.importorskip("ray")
    from bench.cluster_step import hop_table

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": ROOT}})
    try:
        rows = hop_table([16], num_actors=2, repeats=3).splitlines()[2:]
    finally:
        ray.shutdown()
    assert [r.split(" | ")[0] for r in rows] == ["| [16, 16] float32 numpy", "| [16, 16] float32 torch"]
    assert all(float(r.split(" | ")[1]) > 0 and float(r.split(" | ")[2]) > 0 for r in rows)
