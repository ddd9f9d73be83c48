"""EPLB: redundant copies for hot experts, packed onto shards to lower max/mean shard load."""

from __future__ import annotations

import pytest
import torch

from router.dispatch import Router
from router.eplb import balance, imbalance, shard_loads
from router.placement import ExpertPlacement, PlacementError


def zipf_load(layers: int, experts: int, seed: int = 0) -> torch.Tensor:
    """[L, E] skewed counts: a few hot experts, the same ones in every layer, plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = 1000.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** 1.2
    base = base[torch.randperm(experts, generator=g)]
    return (base * (0.8 + 0.4 * torch.rand(layers, experts, generator=g, dtype=torch.float64))).round()


def test_uniform_load_stays_balanced_without_copies():
    p = balance(torch.full((3, 8), 10.0), num_shards=4)
    assert sorted(len(ids) for ids in p.shards) == [2, 2, 2, 2]
    assert imbalance(torch.full((3, 8), 10.0), p) == pytest.approx(1.0)


@pytest.mark.parametrize("experts,shards,redundant", [(8, 2, 0), (8, 2, 2), (64, 4, 4), (512, 8, 32)])
def test_balance_lowers_max_over_mean(experts, shards, redundant):
    load = zipf_load(4, experts)
    before = imbalance(load, ExpertPlacement.even(experts, shards))
    p = balance(load, shards, redundant)
    after = imbalance(load, p)
    assert after < before and after >= 1.0
    # every expert placed, copies on distinct shards, memory even (±1 expert per shard)
    assert sum(len(ids) for ids in p.shards) == experts + redundant
    sizes = [len(ids) for ids in p.shards]
    assert max(sizes) - min(sizes) <= 1


def test_hot_expert_gets_the_copies():
    load = torch.tensor([100.0, 1, 1, 1, 1, 1, 1, 1])
    p = balance(load, num_shards=4, num_redundant=3)
    assert p.copies(0) == (0, 1, 2, 3)
    assert imbalance(load, p) < imbalance(load, ExpertPlacement.even(8, 4)) / 2


def test_shard_loads_match_the_router_split():
    """shard_loads' even split of an expert between its copies is what the router does."""
    g = torch.Generator().manual_seed(1)
    ids = torch.multinomial(torch.tensor([8.0, 4, 2, 1, 1, 1, 1, 1]), 2 * 64, replacement=True,
                            generator=g).view(64, 2)
    ids = torch.where(ids[:, :1] == ids[:, 1:], torch.stack([ids[:, 0], (ids[:, 0] + 1) % 8], 1), ids)
    load = torch.bincount(ids.flatten(), minlength=8)
    p = balance(load, num_shards=3, num_redundant=2)
    pairs = [int((i >= 0).sum()) for i in Router(p).plan(ids, torch.ones(64, 2)).ids]
    assert torch.allclose(shard_loads(load, p)[0], torch.tensor(pairs, dtype=torch.float64), atol=2)


def test_bad_budgets_are_refused():
    with pytest.raises(PlacementError, match="shards"):
        balance(torch.ones(4), num_shards=5)
    with pytest.raises(PlacementError, match="redundant"):
        balance(torch.ones(4), num_shards=2, num_redundant=5)


def test_figures_for_the_readme(capsys):
    """Prints before/after max/mean for a Qwen3-Next-sized skewed load (512 experts, 8 shards)."""
    load = zipf_load(48, 512)
    even = imbalance(load, ExpertPlacement.even(512, 8))
    for r in (0, 16, 64):
        after = imbalance(load, balance(load, 8, r))
        with capsys.disabled():
            print(f"\nEPLB 512 experts / 8 shards, {r:2d} redundant: max/mean {even:.3f} -> {after:.3f}")
        assert after < even
