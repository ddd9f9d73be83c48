"""Splitting a step into two micro-batches by whole sequences (a sequence's tokens must meet its
cache in one piece), near-equal in tokens, and putting their logits back in the step's order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.executor import StepInput


@dataclass(frozen=True)
class Split:
    parts: tuple[StepInput | None, StepInput | None]  # None: that micro-batch is empty
    order: tuple[int, ...]  # logits row i of the step is row order[i] of cat(part 0's, part 1's)


def split_step(step: StepInput, min_tokens: int) -> Split:
    """Two micro-batches when the step has >= `min_tokens` (> 0) tokens and > 1 sequence, else one."""
    T, B = len(step.token_ids), len(step.slots)
    if min_tokens <= 0 or min_tokens > T or B < 2:
        return Split((step, None), tuple(range(len(step.logits_index))))
    # the first b sequences go to micro-batch 0; b: where the running token count passes T/2
    b, run = 0, 0
    while b < B - 1 and run + step.lengths[b] <= T / 2:
        run += step.lengths[b]
        b += 1
    b = max(b, 1)
    t0 = sum(step.lengths[:b])
    first = [i for i in step.logits_index if i < t0]
    second = [i - t0 for i in step.logits_index if i >= t0]
    tables = step.block_tables
    # The snapshot copies travel with micro-batch 0, which reaches each layer first on every actor
    # (cluster/step_graph.py binds lane 0 before lane 1), so they run before either lane's tokens.
    # So do speculative decoding's state rollbacks, which run before the saves.
    drafts = step.num_drafts
    p0 = StepInput(step.token_ids[:t0], step.slots[:b], step.starts[:b], step.lengths[:b], tuple(first),
                   None if tables is None else tables[:b], step.state_saves, step.state_loads,
                   num_drafts=drafts[:b] if any(drafts[:b]) else (), state_rollbacks=step.state_rollbacks)
    p1 = StepInput(step.token_ids[t0:], step.slots[b:], step.starts[b:], step.lengths[b:], tuple(second),
                   None if tables is None else tables[b:],
                   num_drafts=drafts[b:] if any(drafts[b:]) else ())
    n0 = iter(range(len(first)))
    n1 = iter(range(len(first), len(first) + len(second)))
    order = tuple(next(n0) if i < t0 else next(n1) for i in step.logits_index)
    return Split((p0, p1), order)


def join_logits(split: Split, logits: list[Tensor | None]) -> Tensor:
    parts = [t for t in logits if t is not None]
    return torch.cat(parts)[list(split.order)] if len(parts) > 1 else parts[0]
