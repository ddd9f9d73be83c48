"""Per-slot caches: the KV cache of a full-attention layer and the conv/recurrent state of a
Gated DeltaNet layer. A slot belongs to one sequence at a time; a sequence whose start is 0
ignores whatever an earlier owner left in its slot, so freeing a slot needs no clearing.

Legend: S slots, M max tokens per slot, N heads, D head dim, C conv channels, K conv kernel."""

from __future__ import annotations

import torch
from torch import Tensor

from model.batch import BatchLayout


class KVCache:
    """Keys (after k_norm and RoPE) and values of one attention layer, [S, M, Nkv, D] each."""

    def __init__(self, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu") -> None:
        shape = (num_slots, max_len, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def write(self, layout: BatchLayout, k: Tensor, v: Tensor) -> None:
        """Store the step's new keys/values, k and v [T, Nkv, D], at their positions."""
        end = int((layout.starts + layout.lengths).max())
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the cache length {self.max_len}")
        slot_of_token = layout.slots.repeat_interleave(layout.lengths)  # [T]
        self.k[slot_of_token, layout.positions] = k.to(self.k.dtype)
        self.v[slot_of_token, layout.positions] = v.to(self.v.dtype)

    def read(self, layout: BatchLayout) -> tuple[Tensor, Tensor]:
        """Keys and values of every sequence up to its last new token: [B, Lk, Nkv, D] each,
        Lk = the longest sequence; positions past a sequence's end are stale and must be masked."""
        end = int((layout.starts + layout.lengths).max())
        return self.k[layout.slots, :end], self.v[layout.slots, :end]


class DeltaNetState:
    """Conv state (the last K-1 pre-conv inputs, [S, C, K-1], model dtype) and recurrent state
    ([S, Hv, Dk, Dv], float32) of one Gated DeltaNet layer."""

    def __init__(self, num_slots: int, conv_dim: int, conv_kernel: int, num_v_heads: int,
                 k_head_dim: int, v_head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.conv = torch.zeros(num_slots, conv_dim, conv_kernel - 1, dtype=dtype, device=device)
        self.recurrent = torch.zeros(num_slots, num_v_heads, k_head_dim, v_head_dim,
                                     dtype=torch.float32, device=device)

    def read(self, layout: BatchLayout) -> tuple[Tensor, Tensor]:
        """Conv [B, C, K-1] and recurrent [B, Hv, Dk, Dv] state of each sequence; zeros for a
        sequence that starts now."""
        fresh = (layout.starts == 0)
        conv = self.conv[layout.slots]
        rec = self.recurrent[layout.slots]
        conv = conv.masked_fill(fresh[:, None, None], 0)
        rec = rec.masked_fill(fresh[:, None, None, None], 0)
        return conv, rec

    def write(self, layout: BatchLayout, conv: Tensor, recurrent: Tensor) -> None:
        self.conv[layout.slots] = conv.to(self.conv.dtype)
        self.recurrent[layout.slots] = recurrent.float()
