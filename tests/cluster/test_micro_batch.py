"""Micro-batches: a step split into m parts by whole sequences (each keeping its KV-cache block
table, drafts and logits rows), near-equal in tokens, lane 0 carrying the state copies, and the
logits joined back in the step's order (no Ray needed); then greedy tokens through the cluster
executor in m = 1, 2 and 3 lanes, compiled graph and plain remote calls, with prefix caching and
MTP speculative decoding on, equal to the local executor's without either.

The last test starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest tests/cluster/test_micro_batch.py'"""

from __future__ import annotations

import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cluster.micro_batch import join_logits, split_step
from engine.executor import StepInput
from tests.ray_fixtures import init_ray


def test_split_keeps_block_tables_with_their_sequences():
    tables = ((7, 3), (0,), (5, 1, 2), (4,))
    step = StepInput(tuple(range(12)), (4, 0, 2, 1), (0, 3, 0, 9), (5, 1, 5, 1), (4, 11, 5, 10, 0), tables)
    a, b = split_step(step, min_tokens=8).parts
    assert (a.slots, a.block_tables) == ((4, 0), ((7, 3), (0,)))
    assert (b.slots, b.block_tables) == ((2, 1), ((5, 1, 2), (4,)))
    untabled = StepInput(step.token_ids, step.slots, step.starts, step.lengths, step.logits_index)
    assert all(p.block_tables is None for p in split_step(untabled, min_tokens=8).parts)


def test_three_micro_batches_near_equal_and_lane_zero_carries_the_copies():
    step = StepInput(tuple(range(12)), (4, 0, 2, 1, 3), (0, 3, 0, 9, 1), (4, 4, 1, 2, 1), (3, 7, 8, 10, 11),
                     state_saves=((4, 0),), state_loads=((1, 2),), state_rollbacks=((0, 1),))
    split = split_step(step, min_tokens=4, micro_batches=3)
    parts = split.parts
    assert [p.slots for p in parts] == [(4,), (0,), (2, 1, 3)]
    assert [len(p.token_ids) for p in parts] == [4, 4, 4]
    assert (parts[0].state_saves, parts[0].state_loads, parts[0].state_rollbacks) == (((4, 0),), ((1, 2),),
                                                                                      ((0, 1),))
    assert all(p.state_saves == p.state_loads == p.state_rollbacks == () for p in parts[1:])
    two_seqs = StepInput((1, 2, 3), (0, 1), (0, 0), (2, 1), (1, 2))
    assert split_step(two_seqs, min_tokens=1, micro_batches=3).parts[2] is None
    assert split_step(step, min_tokens=13, micro_batches=3).parts == (step, None, None)
    with pytest.raises(ValueError, match="micro_batches"):  # pydantic's ValidationError is one
        split_step(step, min_tokens=1, micro_batches=0)


def test_micro_batches_key_is_checked():
    from deployments.config import NextserveConfig

    assert NextserveConfig.from_args({"cluster": {"micro_batches": 3}}).cluster.micro_batches == 3
    with pytest.raises(ValueError, match="micro_batches"):  # pydantic's ValidationError is one
        NextserveConfig.from_args({"cluster": {"micro_batches": 1}})


@st.composite
def steps(draw) -> StepInput:
    lengths = draw(st.lists(st.integers(1, 7), min_size=1, max_size=9))
    B, T = len(lengths), sum(lengths)
    slots = tuple(draw(st.permutations(range(B))))
    starts = tuple(draw(st.lists(st.integers(0, 20), min_size=B, max_size=B)))
    # the rows the caller wants: any packed positions, in any order, repeats allowed
    logits_index = tuple(draw(st.lists(st.integers(0, T - 1), min_size=1, max_size=2 * T)))
    tables = tuple(tuple(draw(st.lists(st.integers(0, 50), min_size=1, max_size=3))) for _ in range(B)) \
        if draw(st.booleans()) else None
    drafts = tuple(draw(st.integers(0, n - 1)) for n in lengths) if draw(st.booleans()) else ()
    return StepInput(tuple(range(100, 100 + T)), slots, starts, tuple(lengths), logits_index, tables,
                     state_saves=((slots[0], 1),), state_loads=((2, slots[-1]),), num_drafts=drafts,
                     state_rollbacks=((slots[0], 1),))


@settings(max_examples=300, deadline=None)
@given(steps(), st.integers(1, 5), st.integers(0, 40))
def test_split_then_join_is_the_step(step, m, min_tokens):
    split = split_step(step, min_tokens, m)
    T, B = len(step.token_ids), len(step.slots)
    assert len(split.parts) == m
    live = [p for p in split.parts if p is not None]
    assert split.parts[: len(live)] == tuple(live)  # the empty lanes are the last ones
    splits = m > 1 and 0 < min_tokens <= T and B > 1
    assert len(live) == (min(m, B) if splits else 1)
    # whole sequences, in order, every field with its sequence
    for field in ("token_ids", "slots", "starts", "lengths"):
        assert sum((getattr(p, field) for p in live), ()) == getattr(step, field)
    if step.block_tables is not None:
        assert sum((p.block_tables for p in live), ()) == step.block_tables
    assert sum((p.num_drafts or (0,) * len(p.slots) for p in live), ()) == (step.num_drafts or (0,) * B)
    # the state copies and rollbacks run once, in lane 0
    assert (live[0].state_saves, live[0].state_loads, live[0].state_rollbacks) == (
        step.state_saves, step.state_loads, step.state_rollbacks)
    assert all(p.state_saves == p.state_loads == p.state_rollbacks == () for p in live[1:])
    # near-equal: each part has fewer than T/k + the longest sequence's tokens
    assert all(len(p.token_ids) < T / len(live) + max(step.lengths) for p in live)
    # each part's logits rows are its tokens; joined back they are the step's rows in order
    fake = [torch.tensor(p.token_ids, dtype=torch.float32)[list(p.logits_index)].unsqueeze(1)
            if p.logits_index else None for p in live]
    want = [float(step.token_ids[i]) for i in step.logits_index]
    assert join_logits(split, fake).flatten().tolist() == want


# -- through the cluster executor --------------------------------------------------------------
@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_next"), arch="qwen3_next")  # with its MTP layer


def test_greedy_tokens_in_one_two_and_three_lanes_with_prefix_caching_and_spec_decode(next_dir):
    ray = pytest.importorskip("ray")
    from cluster.executor import ClusterExecutor
    from deployments.config import NextserveConfig
    from engine.llm_engine import LLMEngine
    from engine.local_executor import LocalExecutor
    from engine.sampling import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    sizes = dict(dtype="float32", num_slots=3, max_model_len=192, block_size=4)
    init_ray(num_cpus=8)
    config = NextserveConfig.from_args({"cluster": {"step_timeout_s": 20, "micro_batch_tokens": 0}})
    cluster = ClusterExecutor(next_dir, config=config, num_state_snapshots=12, speculative_tokens=2, **sizes)
    try:
        on = LLMEngine(cluster, prefix_cache_state_interval=2)
        off = LLMEngine(LocalExecutor(next_dir, **sizes), enable_prefix_caching=False)
        rng = random.Random(0)
        histories = [[rng.randrange(3, 380) for _ in range(rng.randrange(6, 14))] for _ in range(3)]
        # one chat turn per lane count and step kind: every turn after the first resumes from
        # states saved in another lane layout, and its decode steps (3 sequences of 3 tokens) split
        lanes_seen = []
        runs = ((1, "sockets"), (2, "sockets"), (3, "sockets"), (3, "compiled_graph"), (2, "remote_calls"),
                (1, "compiled_graph"))
        for turn, (m, plane) in enumerate(runs):
            if m == 1:
                cluster.configure_step(data_plane=plane, micro_batch_tokens=0)
            else:
                cluster.configure_step(data_plane=plane, micro_batch_tokens=2, micro_batches=m)
            lanes_seen.append(cluster.num_lanes)
            prompts = [h + [rng.randrange(3, 380) for _ in range(3)] for h in histories]
            hits = on.stats.prefix_cache_hit_tokens
            got, want = on.generate(prompts, greedy), off.generate(prompts, greedy)
            assert [g.token_ids for g in got] == [w.token_ids for w in want], f"{m} lanes, {plane}"
            if turn:
                assert on.stats.prefix_cache_hit_tokens > hits  # resumed from saved states
            histories = [p + list(g.token_ids) for p, g in zip(prompts, got, strict=True)]
        assert lanes_seen == [1, 2, 3, 3, 2, 1]
        assert on.stats.spec_decode_num_accepted_tokens > 0
        with pytest.raises(ValueError, match="micro_batches"):  # pydantic's ValidationError is one
            cluster.configure_step(micro_batches=1)
    finally:
        cluster.shutdown()
        ray.shutdown()
