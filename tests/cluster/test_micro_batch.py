"""Micro-batches keep each sequence's KV-cache block table with it (no Ray needed)."""

from cluster.micro_batch import split_step
from engine.executor import StepInput


def test_split_keeps_block_tables_with_their_sequences():
    tables = ((7, 3), (0,), (5, 1, 2), (4,))
    step = StepInput(tuple(range(12)), (4, 0, 2, 1), (0, 3, 0, 9), (5, 1, 5, 1), (4, 11, 5, 10, 0), tables)
    a, b = split_step(step, min_tokens=8).parts
    assert (a.slots, a.block_tables) == ((4, 0), ((7, 3), (0,)))
    assert (b.slots, b.block_tables) == ((2, 1), ((5, 1, 2), (4,)))
    untabled = StepInput(step.token_ids, step.slots, step.starts, step.lengths, step.logits_index)
    assert all(p.block_tables is None for p in split_step(untabled, min_tokens=8).parts)
