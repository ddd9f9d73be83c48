"""The cost model's arithmetic (bench/cost_model.py); its fit to measured runs is in the README."""

import pytest

from bench.cost_model import (
    QWEN3_NEXT_80B,
    LayerCost,
    Shape,
    h100_cost,
    max_edge_ms,
    single_process_ms,
    step_ms,
)

SHAPE = Shape(layers=8, attention_layers=2, moe_layers=8)


def flat(batch: int) -> LayerCost:
    return LayerCost(attention_ms=1.0 * batch, deltanet_ms=1.0 * batch, experts_ms=1.0 * batch)


def test_one_micro_batch_is_compute_plus_edges():
    assert step_ms(SHAPE, flat, 4, 0.0) == pytest.approx(single_process_ms(SHAPE, flat, 4))
    edges = 2 * 8 + 2
    assert step_ms(SHAPE, flat, 4, 0.5) == pytest.approx(single_process_ms(SHAPE, flat, 4) + 0.5 * edges)


def test_ping_pong_overlaps_only_on_own_cores():
    one = step_ms(SHAPE, flat, 32, 0.1)
    two = step_ms(SHAPE, flat, 32, 0.1, micro_batches=2)
    assert two < 0.6 * one  # mixers and shards balanced: about half
    assert step_ms(SHAPE, flat, 32, 0.1, micro_batches=2, own_cores=False) >= one


def test_max_edge_keeps_the_step_within_the_bound():
    e = max_edge_ms(QWEN3_NEXT_80B, h100_cost, 32)
    assert e > 0
    single = single_process_ms(QWEN3_NEXT_80B, h100_cost, 32)
    assert step_ms(QWEN3_NEXT_80B, h100_cost, 32, e) == pytest.approx(1.2 * single, rel=1e-6)


@pytest.mark.parametrize("edge", [0.0, 0.2, 5.0])
@pytest.mark.parametrize("m", [2, 3])
def test_ping_pong_runs_at_its_busiest_stage_not_the_sum(edge, m):
    # Between the busiest actor's total work (or one lane's trip through every layer) and the
    # sum over layers of max(the mixer's m turns, the shards' m turns, one lane's round trip),
    # plus filling the pipeline: not the one-lane sum.
    deep = Shape(layers=48, attention_layers=12, moe_layers=48)

    def cost(n):
        return LayerCost(attention_ms=0.5 * n, deltanet_ms=0.25 * n, experts_ms=0.4 * n)

    lanes = [32 // m + (1 if i < 32 % m else 0) for i in range(m)]
    whole, big = cost(32), cost(lanes[0])  # linear: the lanes' turns add up to the whole batch's
    mixers = [(whole.attention_ms, big.attention_ms)] * 12 + [(whole.deltanet_ms, big.deltanet_ms)] * 36
    busiest = max(48 * whole.experts_ms, 12 * whole.attention_ms, 36 * whole.deltanet_ms,
                  sum(b + big.experts_ms + 2 * edge for _, b in mixers))
    cycles = sum(max(w, whole.experts_ms, b + big.experts_ms + 2 * edge) for w, b in mixers)
    got = step_ms(deep, cost, 32, edge, micro_batches=m)
    assert busiest <= got <= cycles + m * (big.attention_ms + big.experts_ms) + 2 * edge
    if edge < 1:
        assert got < 0.75 * step_ms(deep, cost, 32, edge)
