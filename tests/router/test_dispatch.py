"""Router plan → dispatch → per-shard partial sums → combine against the dense MoE block
(model.moe.SparseMoeBlock), with even shards, uneven shards and redundant expert copies, rows
selected per shard or (`Router.all_rows`, given k) every row to every shard."""

from __future__ import annotations

import pytest
import torch

from model.config import ModelConfig
from model.moe import Experts, SparseMoeBlock
from router.dispatch import ALL_ROWS_SHARE, Router, combine, row_share
from router.placement import ExpertPlacement, PlacementError, even_split

E, K, H = 8, 3, 32


def moe_config() -> ModelConfig:
    return ModelConfig.from_hf(dict(
        architectures=["Qwen3NextForCausalLM"], vocab_size=64, hidden_size=H, num_hidden_layers=1,
        num_attention_heads=2, head_dim=16, max_position_embeddings=64, num_experts=E,
        num_experts_per_tok=K, moe_intermediate_size=16, shared_expert_intermediate_size=24,
        norm_topk_prob=True, dtype="float32"))


@pytest.fixture(scope="module")
def block() -> SparseMoeBlock:
    torch.manual_seed(0)
    b = SparseMoeBlock(moe_config())
    with torch.no_grad():
        for p in b.parameters():
            p.normal_(0, 0.3)
    return b


def shard_of(block: SparseMoeBlock, expert_ids) -> Experts:
    ex = Experts(H, 16, expert_ids, E)
    with torch.no_grad():
        idx = torch.tensor(list(expert_ids), dtype=torch.long)
        ex.gate_up.copy_(block.experts.gate_up[idx])
        ex.down.copy_(block.experts.down[idx])
    return ex


def routed(block: SparseMoeBlock, placement: ExpertPlacement, x: torch.Tensor,
           experts_per_token: int | None = None) -> torch.Tensor:
    """What the cluster computes: the mixer gates, plans and dispatches; each shard sums its
    experts over its rows; the next mixer combines and adds the shared expert."""
    ids, w = block.gate(x)
    plan = Router(placement, experts_per_token).plan(ids, w)
    shards = [shard_of(block, held) for held in placement.shards]
    rows = [x if r is None else x[r] for r in plan.rows]  # dispatch
    partials = [s(xs, i, ws) for s, xs, i, ws in zip(shards, rows, plan.ids, plan.weights, strict=True)]
    return combine(partials, plan.rows, x.shape[0]) + block.shared(x)


PLACEMENTS = {
    "one_shard": ExpertPlacement.even(E, 1),
    "even_3": ExpertPlacement.even(E, 3),
    "uneven": ExpertPlacement.from_lists(E, [[0, 7], [1, 2, 3, 4, 5], [6]]),
    "redundant_hot": ExpertPlacement.from_lists(E, [[0, 1, 2, 3], [4, 5, 6, 7], [0, 5], [0]]),
    "everything_twice": ExpertPlacement.from_lists(E, [list(range(E)), list(range(E))]),
}


@pytest.mark.parametrize("name", sorted(PLACEMENTS))
@pytest.mark.parametrize("T", [1, 5, 64])
@pytest.mark.parametrize("k", [None, K])
def test_routed_equals_dense_block(block, name, T, k):
    x = torch.randn(T, H, generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        torch.testing.assert_close(routed(block, PLACEMENTS[name], x, k), block(x), atol=1e-5, rtol=1e-5)


def test_all_rows_where_shards_would_get_nearly_every_row():
    """Without k, or with copies of an expert, rows are selected; with k, only where every shard's
    share of the rows (a token's chance to have a pair on it) reaches ALL_ROWS_SHARE."""
    assert row_share(8, 4, 3) == 1 - 4 / 56 >= ALL_ROWS_SHARE  # 2 shards of 4: 93 % of rows each
    assert row_share(8, 3, 3) == 1 - 10 / 56 < ALL_ROWS_SHARE
    assert row_share(16, 8, 4) > 0.96  # the tiny checkpoints on 2 shards
    assert row_share(512, 64, 10) < 0.75  # Qwen3-Next on 8 shards
    assert Router(ExpertPlacement.even(E, 2), K).all_rows
    assert Router(ExpertPlacement.even(E, 1), K).all_rows
    assert not Router(ExpertPlacement.even(E, 2)).all_rows  # k unknown
    assert not Router(PLACEMENTS["even_3"], K).all_rows
    assert not Router(PLACEMENTS["everything_twice"], K).all_rows  # copies: split between them
    ids, w = torch.tensor([[0, 1, 2], [5, 6, 7]]), torch.rand(2, K)
    plan = Router(ExpertPlacement.even(E, 2), K).plan(ids, w)
    assert plan.rows == (None, None)
    assert all(i is ids for i in plan.ids) and all(x is w for x in plan.weights)


def test_combine_mixes_all_rows_and_selected_rows():
    p0, p1 = torch.randn(4, H), torch.randn(2, H)
    want = p0.clone()
    want[torch.tensor([1, 3])] += p1
    torch.testing.assert_close(combine([p0, p1], [None, torch.tensor([1, 3])], 4), want)
    torch.testing.assert_close(combine([p0, p0], [None, None], 4), p0 + p0, rtol=0, atol=0)
    with pytest.raises(ValueError, match="2 partial outputs for 1"):
        combine([p0, p0], [None], 4)


def test_every_pair_computed_once_and_replicas_share_the_load():
    placement = PLACEMENTS["redundant_hot"]
    T = 90
    ids = torch.zeros(T, K, dtype=torch.long)
    ids[:, 1], ids[:, 2] = 5, 3  # every token picks experts 0 (3 copies), 5 (2 copies), 3 (1 copy)
    ids[7, 2] = -1  # a dropped pair goes nowhere
    plan = Router(placement).plan(ids, torch.ones(T, K))
    seen = torch.zeros(T, K, dtype=torch.long)
    for s, (rows, sids) in enumerate(zip(plan.rows, plan.ids, strict=True)):
        held = torch.tensor(placement.shards[s])
        assert torch.isin(sids[sids >= 0], held).all(), "a shard got an expert it does not hold"
        seen[rows] += (sids >= 0).long()
    expected = torch.ones(T, K, dtype=torch.long)
    expected[7, 2] = 0
    assert torch.equal(seen, expected)
    per_copy = {s: int((plan.ids[s] == 0).sum()) for s in placement.copies(0)}
    assert sorted(per_copy.values()) == [30, 30, 30], per_copy
    per_copy5 = {s: int((plan.ids[s] == 5).sum()) for s in placement.copies(5)}
    assert sorted(per_copy5.values()) == [45, 45], per_copy5
    assert sum(int((i >= 0).sum()) for i in plan.ids) == T * K - 1


def test_shards_get_only_rows_they_need():
    placement = ExpertPlacement.even(E, 4)  # shard s holds experts 2s, 2s+1
    ids = torch.tensor([[0, 1, 2], [0, 1, 3], [6, 7, 0]])
    plan = Router(placement).plan(ids, torch.ones(3, K))
    assert [r.tolist() for r in plan.rows] == [[0, 1, 2], [0, 1], [], [2]]


def test_placement_errors():
    with pytest.raises(PlacementError, match=r"experts \[3\] are held by no shard"):
        ExpertPlacement.from_lists(4, [[0, 1], [2]])
    with pytest.raises(PlacementError, match="expert 9"):
        ExpertPlacement.from_lists(4, [[0, 1, 2, 3, 9]])
    with pytest.raises(PlacementError, match="5 shards for 4 experts"):
        ExpertPlacement.even(4, 5)
    assert ExpertPlacement.even(8, 3).shards == ((0, 1, 2), (3, 4, 5), (6, 7))


def test_even_split():
    assert [len(p) for p in even_split(range(10), 4)] == [3, 3, 2, 2]
    assert [len(p) for p in even_split(range(512), 3)] == [171, 171, 170]
    assert even_split((3, 7, 11), 2) == [(3, 7), (11,)]
    assert ExpertPlacement.even(10, 4).shards == tuple(even_split(range(10), 4))
