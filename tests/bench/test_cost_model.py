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
