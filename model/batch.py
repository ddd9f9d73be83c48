"""BatchLayout: where each sequence's new tokens sit in a packed step, and how to pad them.

Legend: T packed tokens of the step, B sequences, L = longest new-token run in the step,
P = longest block table. A step mixes prefill chunks and decode tokens; each sequence owns one
state slot and, where given, a table of the KV-cache blocks that hold its tokens."""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass(frozen=True)
class BatchLayout:
    slots: Tensor      # [B] long: cache/state slot of each sequence
    starts: Tensor     # [B] long: tokens of the sequence already in its cache
    lengths: Tensor    # [B] long: new tokens of the sequence in this step (>= 1)
    positions: Tensor  # [T] long: absolute position of each packed token
    pad_index: Tensor  # [B, L] long: packed index of (sequence, new-token i); 0 where invalid
    valid: Tensor      # [B, L] bool
    # [B, P] long: KV-cache block ids of each sequence in token order, -1 past its own table;
    # None: each slot owns a fixed run of blocks (model/cache.py).
    block_tables: Tensor | None = None
    # Speculative decoding: the DeltaNet layers keep their state after each of the first
    # `keep_states` new tokens of every sequence (model/cache.py DeltaNetState.kept), so the
    # engine can roll a sequence back to its last accepted token. 0: only the final state.
    keep_states: int = 0
    # Index tensors derived from the fields above, made once per layout by their user and shared
    # by every layer of the step (model/cache.py: the checked block tables); a cache, not state.
    derived: dict[Hashable, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, slots: list[int], starts: list[int], lengths: list[int],
              device: torch.device | str = "cpu",
              block_tables: Sequence[Sequence[int]] | None = None, keep_states: int = 0) -> BatchLayout:
        if not (len(slots) == len(starts) == len(lengths)) or not slots:
            raise ValueError("BatchLayout needs one (slot, start, length) per sequence, at least one")
        if min(lengths) < 1:
            raise ValueError(f"every sequence needs at least one new token, got lengths={lengths}")
        if len(set(slots)) != len(slots):
            raise ValueError(f"a slot appears twice in one step: {slots}")
        L = max(lengths)
        lengths_t = torch.tensor(lengths, dtype=torch.long)
        starts_t = torch.tensor(starts, dtype=torch.long)
        offsets = torch.cumsum(lengths_t, 0) - lengths_t  # [B]
        i = torch.arange(L)
        valid = i[None, :] < lengths_t[:, None]  # [B, L]
        pad_index = torch.where(valid, offsets[:, None] + i[None, :], 0)
        positions = torch.cat([torch.arange(s, s + n) for s, n in zip(starts, lengths, strict=True)])
        tables = None if block_tables is None else _padded_tables(block_tables, len(slots)).to(device)
        return cls(
            slots=torch.tensor(slots, dtype=torch.long, device=device),
            starts=starts_t.to(device),
            lengths=lengths_t.to(device),
            positions=positions.to(device),
            pad_index=pad_index.to(device),
            valid=valid.to(device),
            block_tables=tables,
            keep_states=keep_states,
        )

    @property
    def num_seqs(self) -> int:
        return self.slots.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    @property
    def is_decode(self) -> bool:
        """Every sequence brings exactly one new token."""
        return self.pad_index.shape[1] == 1

    def last_token_index(self) -> Tensor:
        """[B] packed index of each sequence's last new token."""
        return torch.cumsum(self.lengths, 0) - 1

    @property
    def is_uniform(self) -> bool:
        """Every sequence brings the same number of new tokens (a burst of equal prompts, or a
        decode step): the packed tokens are the padded batch, with no padding."""
        return self.num_tokens == self.pad_index.numel()

    def to_padded(self, x: Tensor) -> Tensor:
        """[T, ...] -> [B, L, ...], zeros where invalid."""
        if self.is_uniform:  # a view: no gather, no mask pass
            return x.reshape(*self.pad_index.shape, *x.shape[1:])
        xp = x[self.pad_index]
        mask = self.valid.view(*self.valid.shape, *([1] * (x.dim() - 1)))
        return xp * mask.to(xp.dtype)

    def to_packed(self, xp: Tensor) -> Tensor:
        """[B, L, ...] -> [T, ...]."""
        if self.is_uniform:
            return xp.reshape(self.num_tokens, *xp.shape[2:])
        return xp[self.valid]

    def to(self, device: torch.device | str) -> BatchLayout:
        return BatchLayout(*(t.to(device) for t in (self.slots, self.starts, self.lengths,
                                                   self.positions, self.pad_index, self.valid)),
                           block_tables=None if self.block_tables is None else self.block_tables.to(device),
                           keep_states=self.keep_states)


def _padded_tables(tables: Sequence[Sequence[int]], num_seqs: int) -> Tensor:
    """[B, P] long, each table padded with -1 (which no real block id is)."""
    if len(tables) != num_seqs:
        raise ValueError(f"{len(tables)} block tables for {num_seqs} sequences")
    if any(not t for t in tables):
        raise ValueError("every sequence's block table needs at least one block")
    if any(b < 0 for t in tables for b in t):
        raise ValueError(f"block ids must be >= 0, got {[list(t) for t in tables]}")
    width = max(len(t) for t in tables)
    return torch.tensor([[*t, *([-1] * (width - len(t)))] for t in tables], dtype=torch.long)
