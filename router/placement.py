"""ExpertPlacement: which expert shard(s) hold each routed expert. A hot expert may be placed on
several shards (redundant copies); the dispatch plan splits its tokens across the copies."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def even_split(items: Sequence[T], parts: int) -> list[tuple[T, ...]]:
    """`items` in `parts` contiguous runs of near-equal length, the longer ones first: 10 items in
    4 parts are 3, 3, 2, 2. Experts over shards, and layers over mixer actors, are split so."""
    base, extra = divmod(len(items), parts)
    out, start = [], 0
    for p in range(parts):
        n = base + (p < extra)
        out.append(tuple(items[start:start + n]))
        start += n
    return out


class PlacementError(ValueError):
    """An expert placement that leaves an expert unplaced or names one that does not exist."""


@dataclass(frozen=True)
class ExpertPlacement:
    num_experts: int
    shards: tuple[tuple[int, ...], ...]  # shards[s]: global expert ids held by shard s, ascending

    def __post_init__(self) -> None:
        if not self.shards:
            raise PlacementError("an expert placement needs at least one shard")
        for s, ids in enumerate(self.shards):
            bad = [e for e in ids if not 0 <= e < self.num_experts]
            if bad:
                raise PlacementError(f"shard {s} holds expert {bad[0]}, outside 0..{self.num_experts - 1}")
            if len(set(ids)) != len(ids):
                raise PlacementError(f"shard {s} lists an expert twice: {list(ids)}")
        unplaced = sorted(set(range(self.num_experts)) - {e for ids in self.shards for e in ids})
        if unplaced:
            raise PlacementError(f"experts {unplaced} are held by no shard")

    @classmethod
    def even(cls, num_experts: int, num_shards: int) -> ExpertPlacement:
        """Contiguous, near-equal slices (even_split): the first `num_experts % num_shards` shards
        hold one more."""
        if not 1 <= num_shards <= num_experts:
            raise PlacementError(f"{num_shards} shards for {num_experts} experts")
        return cls(num_experts, tuple(even_split(range(num_experts), num_shards)))

    @classmethod
    def from_lists(cls, num_experts: int, shards: Sequence[Sequence[int]]) -> ExpertPlacement:
        return cls(num_experts, tuple(tuple(sorted(int(e) for e in ids)) for ids in shards))

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def copies(self, expert: int) -> tuple[int, ...]:
        """The shards that hold `expert`, ascending."""
        return tuple(s for s, ids in enumerate(self.shards) if expert in ids)

    def copy_table(self) -> tuple[Tensor, Tensor]:
        """(table [E, R] long: the r-th shard holding expert e, -1 past its copies; count [E])."""
        copies = [self.copies(e) for e in range(self.num_experts)]
        R = max(len(c) for c in copies)
        table = torch.full((self.num_experts, R), -1, dtype=torch.long)
        for e, c in enumerate(copies):
            table[e, : len(c)] = torch.tensor(c, dtype=torch.long)
        return table, torch.tensor([len(c) for c in copies], dtype=torch.long)
