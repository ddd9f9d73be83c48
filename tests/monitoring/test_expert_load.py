"""ExpertLoad against hand-counted cases."""

from __future__ import annotations

import pytest

from monitoring.expert_load import ExpertLoad, active_params_ratio


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
