"""The token router: gate top-k → a dispatch plan (which token rows go to which expert shard, for
which experts, with which weights) → dispatch (the mixer sends each shard its rows) → per-shard
weighted partial sums (done by the shards: model.moe.Experts) → combine (scatter-add the partials
back).

Legend: T tokens, H hidden, k experts per token, E experts, S shards, n_s rows sent to shard s,
P = T·k (token, expert) pairs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from router.placement import ExpertPlacement


@dataclass(frozen=True)
class DispatchPlan:
    """Per shard s: `rows[s]` [n_s] the token rows it gets, `ids[s]` [n_s, k] the global expert
    ids it computes for them (-1: that pair is another shard's) and `weights[s]` [n_s, k]."""

    num_tokens: int
    rows: tuple[Tensor, ...]
    ids: tuple[Tensor, ...]
    weights: tuple[Tensor, ...]

    @property
    def num_shards(self) -> int:
        return len(self.rows)


class Router:
    """Plans dispatch for one placement; the copy table is built once, not per step."""

    def __init__(self, placement: ExpertPlacement) -> None:
        self.placement = placement
        self.table, self.count = placement.copy_table()  # [E, R], [E]

    def plan(self, ids: Tensor, weights: Tensor) -> DispatchPlan:
        """ids [T, k] (long, -1: dropped pair), weights [T, k] from the gate."""
        T = ids.shape[0]
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


def combine(partials: Sequence[Tensor], rows: Sequence[Tensor], num_tokens: int) -> Tensor:
    """Scatter-add the shards' partial sums ([n_s, H] each, for token rows `rows[s]`) into [T, H]."""
    if not partials:
        raise ValueError("combine needs at least one shard's partial output")
    out = torch.zeros(num_tokens, partials[0].shape[-1], dtype=partials[0].dtype, device=partials[0].device)
    for part, r in zip(partials, rows, strict=True):
        out.index_add_(0, r, part)
    return out
