"""The token router: gate top-k → a dispatch plan (which token rows go to which expert shard, for
which experts, with which weights) → dispatch (the mixer sends each shard its rows) → per-shard
weighted partial sums (done by the shards: model.moe.Experts) → combine (scatter-add the partials
back).

Legend: T tokens, H hidden, k experts per token, E experts, S shards, n_s rows sent to shard s,
P = T·k (token, expert) pairs."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from router.placement import ExpertPlacement

# A shard gets every token row, unselected, when a token picked uniformly at random has a pair on
# it with at least this probability (see `Router.all_rows`).
ALL_ROWS_SHARE = 0.9


@dataclass(frozen=True)
class DispatchPlan:
    """Per shard s: `rows[s]` [n_s] the token rows it gets, `ids[s]` [n_s, k] the global expert
    ids it computes for them (-1: that pair is another shard's) and `weights[s]` [n_s, k].
    `rows[s]` None: every row, in order (`Router.all_rows`); `ids[s]` and `weights[s]` are then the
    gate's own [T, k], shared by all shards, and a shard computes the pairs of the experts it holds
    (model.moe.Experts skips the others)."""

    num_tokens: int
    rows: tuple[Tensor | None, ...]
    ids: tuple[Tensor, ...]
    weights: tuple[Tensor, ...]

    @property
    def num_shards(self) -> int:
        return len(self.rows)


def row_share(num_experts: int, held: int, k: int) -> float:
    """The probability that a token's k distinct experts, drawn uniformly from `num_experts`,
    include one of the `held` a shard holds."""
    return 1.0 - math.comb(num_experts - held, k) / math.comb(num_experts, k)


class Router:
    """Plans dispatch for one placement; the copy table is built once, not per step.

    With `experts_per_token` (k) given, a placement without copies whose every shard would get
    nearly every row anyway (`row_share` >= ALL_ROWS_SHARE: the tiny checkpoints' 16 experts top-4
    on 2 shards, 0.96) dispatches `all_rows`: each shard gets the whole batch and the gate's ids
    and weights as they are, so planning is free (no per-shard masks, row selection or scatter in
    `combine`) at the cost of the few rows with no pair on a shard (4 % there). Where shards are
    sparser (Qwen3-Next's 512 experts top-10 on 8 shards: 0.74) rows are selected per shard."""

    def __init__(self, placement: ExpertPlacement, experts_per_token: int | None = None) -> None:
        self.placement = placement
        self.table, self.count = placement.copy_table()  # [E, R], [E]
        E = placement.num_experts
        self.all_rows = (experts_per_token is not None and self.table.shape[1] == 1
                         and all(row_share(E, len(held), experts_per_token) >= ALL_ROWS_SHARE
                                 for held in placement.shards))

    def plan(self, ids: Tensor, weights: Tensor) -> DispatchPlan:
        """ids [T, k] (long, -1: dropped pair), weights [T, k] from the gate."""
        T = ids.shape[0]
        S = self.placement.num_shards
        if self.all_rows:
            return DispatchPlan(T, (None,) * S, (ids,) * S, (weights,) * S)
        shard = self.shard_of_pairs(ids)  # [T, k]
        rows, sids, sweights = [], [], []
        for s in range(self.placement.num_shards):
            mine = shard == s  # [T, k]
            r = mine.any(dim=1).nonzero().squeeze(1)  # [n_s]
            rows.append(r)
            sids.append(torch.where(mine, ids, -1)[r])
            sweights.append(torch.where(mine, weights, torch.zeros_like(weights))[r])
        return DispatchPlan(T, tuple(rows), tuple(sids), tuple(sweights))

    def shard_of_pairs(self, ids: Tensor) -> Tensor:
        """[T, k] the shard that computes each pair (-1 for dropped pairs). The pairs of an expert
        with r copies are split, in token order, into r contiguous near-equal runs, one per copy."""
        table, count = self.table.to(ids.device), self.count.to(ids.device)
        flat = ids.flatten()  # [P]
        valid = flat >= 0
        e = flat.clamp(min=0)
        ncopies = count[e]  # [P]
        if table.shape[1] == 1:
            return torch.where(valid, table[e, 0], -1).view_as(ids)
        # rank of each pair among the pairs of its expert, in token order
        key = torch.where(valid, e, -1)
        order = torch.argsort(key, stable=True)
        per_expert = torch.bincount(e[valid], minlength=self.placement.num_experts)  # [E]
        first = torch.cumsum(per_expert, 0) - per_expert + int((~valid).sum())  # [E]
        rank = torch.empty_like(flat)
        rank[order] = torch.arange(flat.numel(), device=ids.device) - first[key[order].clamp(min=0)]
        copy = rank * ncopies // per_expert[e].clamp(min=1)
        return torch.where(valid, table[e, copy.clamp(min=0)], -1).view_as(ids)


def combine(partials: Sequence[Tensor], rows: Sequence[Tensor | None], num_tokens: int) -> Tensor:
    """Scatter-add the shards' partial sums ([n_s, H] each, for token rows `rows[s]`; None: all
    [T, H] rows in order) into [T, H], in shard order: the same sums either way."""
    if not partials:
        raise ValueError("combine needs at least one shard's partial output")
    if len(partials) != len(rows):
        raise ValueError(f"{len(partials)} partial outputs for {len(rows)} shards' rows")
    if all(r is None for r in rows):  # all_rows: no zeros to scatter into (0 + p0 is p0 exactly)
        out = partials[0]
        for part in partials[1:]:
            out = out + part
        return out
    out = torch.zeros(num_tokens, partials[0].shape[-1], dtype=partials[0].dtype, device=partials[0].device)
    for part, r in zip(partials, rows, strict=True):
        if r is None:
            out.add_(part)
        else:
            out.index_add_(0, r, part)
    return out
