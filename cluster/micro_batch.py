"""Splitting a step into m micro-batches by whole sequences (a sequence's tokens must meet its
cache in one piece), near-equal in tokens, and putting their logits back in the step's order."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from engine.executor import StepInput


@dataclass(frozen=True)
class Split:
    parts: tuple[StepInput | None, ...]  # one per lane; None: that micro-batch is empty
    order: tuple[int, ...]  # logits row i of the step is row order[i] of cat(the parts' logits)


def _bounds(lengths: tuple[int, ...], k: int) -> list[int]:
    """Sequence indices cutting `lengths` into k >= 2 non-empty runs: cut j (1..k-1) after the
    sequences whose running token count stays <= T·j/k, moved only as far as every run needs to
    keep one sequence. So each run has < T/k + the longest sequence's tokens."""
    T, B = sum(lengths), len(lengths)
    cuts, b, run = [0], 0, 0
    for j in range(1, k):
        while b < B and run + lengths[b] <= T * j / k:
            run += lengths[b]
            b += 1
        cut = min(max(b, cuts[-1] + 1), B - (k - j))
        cuts.append(cut)
        b, run = cut, sum(lengths[:cut])
    return [*cuts, B]


def split_step(step: StepInput, min_tokens: int, micro_batches: int = 2) -> Split:
    """`micro_batches` (>= 1) parts when the step has >= `min_tokens` (> 0) tokens and > 1 sequence,
    as many non-empty ones as it has sequences (up to `micro_batches`), the rest None; else the
    whole step in part 0."""
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    T, B = len(step.token_ids), len(step.slots)
    empty: tuple[None, ...] = (None,) * (micro_batches - 1)
    if micro_batches == 1 or min_tokens <= 0 or min_tokens > T or B < 2:
        return Split((step, *empty), tuple(range(len(step.logits_index))))
    k = min(micro_batches, B)
    cuts = _bounds(step.lengths, k)
    offsets = [sum(step.lengths[:c]) for c in cuts]  # token offset of each cut
    tables, drafts = step.block_tables, step.num_drafts
    parts: list[StepInput | None] = []
    rows: list[list[int]] = []
    for j in range(k):
        a, b = cuts[j], cuts[j + 1]
        t0, t1 = offsets[j], offsets[j + 1]
        rows.append([i for i in step.logits_index if t0 <= i < t1])
        # The snapshot copies travel with micro-batch 0, which reaches each layer first on every
        # actor (cluster/step_graph.py binds lane 0 before the others), so they run before any
        # lane's tokens. So do speculative decoding's state rollbacks, which run before the saves.
        first = j == 0
        parts.append(StepInput(step.token_ids[t0:t1], step.slots[a:b], step.starts[a:b], step.lengths[a:b],
                               tuple(i - t0 for i in rows[-1]), None if tables is None else tables[a:b],
                               step.state_saves if first else (), step.state_loads if first else (),
                               num_drafts=drafts[a:b] if any(drafts[a:b]) else (),
                               state_rollbacks=step.state_rollbacks if first else ()))
    # Row i of the step (token logits_index[i]) is the next unused row of its part in
    # cat(the parts' logits): each part keeps its rows in the step's order.
    nxt = [sum(len(r) for r in rows[:j]) for j in range(k)]
    order = []
    for i in step.logits_index:
        j = next(j for j in range(k) if offsets[j] <= i < offsets[j + 1])
        order.append(nxt[j])
        nxt[j] += 1
    return Split((*parts, *(None,) * (micro_batches - k)), tuple(order))


def join_logits(split: Split, logits: list[Tensor | None]) -> Tensor:
    parts = [t for t in logits if t is not None]
    return torch.cat(parts)[list(split.order)] if len(parts) > 1 else parts[0]
