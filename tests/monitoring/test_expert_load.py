"""ExpertLoad against hand-counted cases, and GateTap against the gate's own output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monitoring.expert_load import ExpertLoad, active_params_ratio
from monitoring.gate_tap import GateTap


def test_sparsity_imbalance_and_shards():
    load = ExpertLoad(4, shards=[[0, 1], [2, 3]])
    (s,) = load.record({3: [6, 2, 0, 0]})  # 4 tokens × top-2
    assert s.layer == 3 and s.num_pairs == 8
    assert s.active_ratio == 0.5  # 2 of 4 experts
    assert s.imbalance == 6 / 2  # max 6, mean 8/4
    assert s.per_shard == (8, 0)
    load.record({3: [0, 0, 1, 1]})
    assert load.totals(3) == [6, 2, 1, 1] and load.shard_totals(3) == [8, 2]
    j = load.to_json()
    assert j["layers"] == [3] and j["counts"] == [[6, 2, 1, 1]] and j["num_steps"] == 2
    assert j["last_step"][0]["active_ratio"] == 0.5


def test_redundant_expert_split_keeps_integer_totals():
    load = ExpertLoad(3, shards=[[0, 1], [2, 0]])  # expert 0 has a copy on both shards
    (s,) = load.record({0: [5, 1, 2]})
    assert sum(s.per_shard) == 8
    assert s.per_shard in ((4, 4), (3, 5))  # expert 0's 5 pairs split 3/2 or 2/3


def test_empty_step_and_bad_input():
    load = ExpertLoad(2)
    (s,) = load.record({0: [0, 0]})
    assert s.active_ratio == 0 and s.imbalance == 0
    with pytest.raises(ValueError, match="expected 2 counts"):
        load.record({0: [1, 2, 3]})
    with pytest.raises(ValueError, match="every expert"):
        ExpertLoad(3, shards=[[0, 1]])


def test_shards_follow_the_placement_in_force():
    """A callable placement is read at every step: a rebalance shows from the next step on, and
    the totals per shard add up what each shard computed at the time."""
    placement = [[0, 1], [2, 3]]
    load = ExpertLoad(4, lambda: placement)
    (s,) = load.record({0: [1, 2, 3, 4]})
    assert s.per_shard == (3, 7)
    placement = [[0, 3], [1, 2]]
    (s,) = load.record({0: [1, 2, 3, 4]})
    assert s.per_shard == (5, 5) and load.shards == placement
    assert load.shard_totals(0) == [8, 12] and load.to_json()["shards"] == placement


def test_active_params():
    # 100 params, 80 of them in 8 experts, top-2: 20 dense + 20 routed
    assert active_params_ratio(100, 80, 2, 8) == pytest.approx(0.4)


class _Gate(torch.nn.Module):
    def forward(self, ids):
        return ids, torch.ones_like(ids, dtype=torch.float32)


def test_gate_tap_counts_what_the_gate_returns():
    gates = {1: _Gate(), 5: _Gate()}
    tap = GateTap(gates, num_experts=4)
    gates[1](torch.tensor([[0, 1], [0, 3]]))
    gates[1](torch.tensor([[2, -1]]))  # a second micro-batch of the same step; -1: dropped pair
    gates[5](torch.tensor([[3, 3]]))
    assert tap.take() == {1: [2, 1, 1, 1], 5: [0, 0, 0, 2]}
    assert tap.take() == {}
    tap.remove()
    gates[1](torch.tensor([[0, 1]]))
    assert tap.take() == {}


def test_gate_tap_on_the_real_gate():
    from model.moe import TopKGate

    gate = TopKGate(8, 6, 2, norm_topk_prob=True)
    torch.nn.init.normal_(gate.weight)
    tap = GateTap({0: gate}, num_experts=6)
    x = torch.randn(5, 8)
    ids, _ = gate(x)
    want = np.bincount(ids.flatten().numpy(), minlength=6).tolist()
    assert tap.take() == {0: want}
