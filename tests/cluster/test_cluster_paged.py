"""The cluster executor's attention actors follow the engine's block tables: steps through shuffled,
non-contiguous tables of a small KV pool, split into two micro-batch lanes, give the logits of the
local executor with its default slot-contiguous tables.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest tests/cluster -q'"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster.executor import ClusterExecutor  # noqa: E402
from deployments.config import NextserveConfig  # noqa: E402
from engine.executor import StepInput  # noqa: E402
from engine.local_executor import LocalExecutor  # noqa: E402
from tests.ray_fixtures import ray_session_fixture  # noqa: E402

ray_session = ray_session_fixture(num_cpus=16)


def test_block_tables_through_two_micro_batch_lanes(hf_next_dir):
    g = torch.Generator().manual_seed(5)
    ids = torch.randperm(13, generator=g).tolist()
    tables = (ids[0:4], ids[4:8], ids[8:12])  # by slot: 16 tokens each, in scattered blocks

    def toks(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(2, 384, (n,), generator=g).tolist())

    def with_tables(step: StepInput) -> StepInput:
        return replace(step, block_tables=tuple(tuple(tables[s][:-(-(start + n) // 4)]) for s, start, n
                                                in zip(step.slots, step.starts, step.lengths, strict=True)))

    steps = [StepInput(toks(14), (0, 1, 2), (0, 0, 0), (6, 3, 5), (5, 8, 13)),
             StepInput(toks(9), (0, 1, 2), (6, 3, 5), (1, 7, 1), (0, 7, 8)),
             StepInput(toks(3), (2, 0, 1), (6, 7, 10), (1, 1, 1), (0, 1, 2)),
             StepInput(toks(9), (1, 2), (11, 7), (5, 4), (4, 8))]
    local = LocalExecutor(hf_next_dir, dtype="float32", num_slots=3, max_model_len=32, block_size=4)
    config = NextserveConfig.from_args({"cluster": {"micro_batch_tokens": 8},
                                        "pools": {"experts": {"actors": 2}}})
    cluster = ClusterExecutor(hf_next_dir, dtype="float32", num_slots=3, max_model_len=32, block_size=4,
                              num_kv_blocks=13, config=config)
    try:
        # 13 blocks, fewer than the default 3 slots × 8: a step that lost its tables is an error.
        assert cluster.num_lanes == 2 and (cluster.num_kv_blocks, local.num_kv_blocks) == (13, 24)
        for i, step in enumerate(steps):
            got, want = cluster.execute(with_tables(step)), local.execute(step)
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                       msg=lambda m, i=i: f"step {i}: {m}")
    finally:
        cluster.shutdown()
