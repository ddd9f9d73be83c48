"""The caches of the token mixers: the paged KV cache of a full-attention layer and the per-slot
conv/recurrent state of a Gated DeltaNet layer, with a pool of saved states for prefix caching. A
sequence whose start is 0 ignores whatever an earlier owner left in its blocks or slot, so freeing
them needs no clearing; one that starts past 0 reads what its slot holds (its own state, or one
loaded from the pool).

Legend: S slots, M max tokens per slot, NB blocks, BS tokens per block, P blocks in a table,
B sequences, T packed tokens, Lk longest cached+new run, N heads, D head dim, C conv channels,
K conv kernel."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from model.batch import BatchLayout


class KVCache:
    """Keys (after k_norm and RoPE) and values of one attention layer, [NB, BS, Nkv, D] each.
    Token p of a sequence lives in row p % BS of block table[p // BS], its table given by the
    layout (the engine's block manager). A layout without tables uses the default ones, slot s
    owning the ceil(M / BS) blocks from s · ceil(M / BS) on: the contiguous cache of S × M tokens
    that `num_blocks` None allocates."""

    def __init__(self, num_slots: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str = "cpu", block_size: int = 16,
                 num_blocks: int | None = None) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.num_slots, self.max_len, self.block_size = num_slots, max_len, block_size
        self.blocks_per_slot = -(-max_len // block_size)
        if num_blocks is None:
            num_blocks = num_slots * self.blocks_per_slot
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        shape = (num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def num_blocks(self) -> int:
        return self.k.shape[0]

    def write(self, layout: BatchLayout, k: Tensor, v: Tensor) -> None:
        """Store the step's new keys/values, k and v [T, Nkv, D], at their positions."""
        write_at, _ = self._index(layout)  # [T]
        self.k.view(-1, *self.k.shape[2:])[write_at] = k.to(self.k.dtype)
        self.v.view(-1, *self.v.shape[2:])[write_at] = v.to(self.v.dtype)

    def read(self, layout: BatchLayout) -> tuple[Tensor, Tensor]:
        """Keys and values of every sequence up to its last new token: [B, Lk, Nkv, D] each,
        Lk = the longest sequence; positions past a sequence's end are stale and must be masked."""
        _, read_at = self._index(layout)  # [B, Lk]
        return self.k.view(-1, *self.k.shape[2:])[read_at], self.v.view(-1, *self.v.shape[2:])[read_at]

    def rows(self, layout: BatchLayout) -> tuple[Tensor, Tensor]:
        """Rows of the flattened [NB·BS, Nkv, D] cache where each new token goes ([T]) and where
        each sequence's tokens up to the step's longest end Lk are ([B, Lk]); checked."""
        return self._index(layout)

    def _index(self, layout: BatchLayout) -> tuple[Tensor, Tensor]:
        """Rows of the flattened [NB·BS, Nkv, D] cache: where each new token goes ([T]) and where
        each sequence's tokens up to the step's longest end Lk are ([B, Lk]). Checked, for a bad
        table would write into another sequence's blocks; made once per step, not per layer: every
        cache of the same shape finds them with the layout."""
        key = ("kv_index", self.num_slots, self.max_len, self.block_size, self.num_blocks)
        if key not in layout.derived:
            table, end = self._checked_table(layout)  # [B, P]
            bs = self.block_size
            seq_of_token = torch.arange(layout.num_seqs, device=table.device).repeat_interleave(
                layout.lengths)  # [T]
            pos = layout.positions
            write_at = table[seq_of_token, pos // bs] * bs + pos % bs  # [T]
            p = torch.arange(end, device=table.device)  # [Lk]
            read_at = table[:, p // bs] * bs + p % bs  # [B, Lk]
            layout.derived[key] = (write_at, read_at)
        return layout.derived[key]

    def _checked_table(self, layout: BatchLayout) -> tuple[Tensor, int]:
        """Entries past a sequence's own end point at block 0; attention masks what they read."""
        ends = layout.starts + layout.lengths  # [B]
        end = int(ends.max())
        width = -(-end // self.block_size)  # P
        if layout.block_tables is None:
            if self.num_blocks < self.num_slots * self.blocks_per_slot:
                raise ValueError(f"a layout without block tables needs the default per-slot tables "
                                 f"({self.num_slots} slots × {self.blocks_per_slot} blocks), but this "
                                 f"cache has only {self.num_blocks} blocks")
            if end > self.max_len:
                raise ValueError(f"sequence of {end} tokens exceeds the cache length {self.max_len}")
            if bool(((layout.slots < 0) | (layout.slots >= self.num_slots)).any()):
                raise ValueError(f"slots {layout.slots.tolist()} outside 0..{self.num_slots - 1}")
            return layout.slots[:, None] * self.blocks_per_slot + torch.arange(width, device=ends.device), end
        tables = layout.block_tables
        if tables.shape[1] < width:
            raise ValueError(f"a sequence of {end} tokens runs past its block table of {tables.shape[1]} "
                             f"blocks of {self.block_size} tokens")
        table = tables[:, :width]
        needed = torch.arange(width, device=ends.device)[None, :] < (-(-ends // self.block_size))[:, None]
        if bool((needed & ((table < 0) | (table >= self.num_blocks))).any()):  # one sync when all is well
            missing = needed & (table < 0)
            if bool(missing.any()):
                b = int(missing.any(1).nonzero()[0])
                raise ValueError(f"sequence {b} of the step has {int(ends[b])} tokens, more than its block "
                                 f"table of {int((tables[b] >= 0).sum())} blocks of {self.block_size} holds")
            bad = table[needed & (table >= self.num_blocks)].tolist()
            raise ValueError(f"block ids {bad} outside the cache's 0..{self.num_blocks - 1}")
        return table.clamp(min=0), end


class DeltaNetState:
    """Conv state (the last K-1 pre-conv inputs, [S, C, K-1], model dtype) and recurrent state
    ([S, Hv, Dk, Dv], float32) of one Gated DeltaNet layer."""

    def __init__(self, num_slots: int, conv_dim: int, conv_kernel: int, num_v_heads: int,
                 k_head_dim: int, v_head_dim: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu") -> None:
        self.conv = torch.zeros(num_slots, conv_dim, conv_kernel - 1, dtype=dtype, device=device)
        self.recurrent = torch.zeros(num_slots, num_v_heads, k_head_dim, v_head_dim,
                                     dtype=torch.float32, device=device)
        # Speculative decoding: per slot of the last verify step (both micro-batch lanes of it),
        # its states after each of its first n tokens: conv [n, C, K-1], recurrent [n, Hv, Dk, Dv].
        self.kept: dict[int, tuple[Tensor, Tensor]] = {}

    def read(self, layout: BatchLayout) -> tuple[Tensor, Tensor]:
        """Conv [B, C, K-1] and recurrent [B, Hv, Dk, Dv] state of each sequence; zeros for a
        sequence that starts now."""
        fresh = (layout.starts == 0)
        conv = self.conv[layout.slots]  # gathered: copies of this step's own
        rec = self.recurrent[layout.slots]
        if bool(fresh.any()):  # a decode step has none: no pass over the states
            conv.masked_fill_(fresh[:, None, None], 0)
            rec.masked_fill_(fresh[:, None, None, None], 0)
        return conv, rec

    def write(self, layout: BatchLayout, conv: Tensor, recurrent: Tensor) -> None:
        self.conv[layout.slots] = conv.to(self.conv.dtype)
        self.recurrent[layout.slots] = recurrent.float()

    def keep(self, layout: BatchLayout, conv: Tensor, recurrent: Tensor) -> None:
        """Hold a verify step's per-position states (layout.keep_states), conv [B, n, C, K-1] and
        recurrent [B, n, Hv, Dk, Dv], until `rollback`."""
        conv, recurrent = conv.to(self.conv.dtype), recurrent.float()
        for b, slot in enumerate(layout.slots.tolist()):
            self.kept[slot] = (conv[b], recurrent[b])

    def rollback(self, rollbacks: Sequence[tuple[int, int]]) -> None:
        """For each (slot, n): set the slot back to its state after the first n new tokens of the
        last verify step (1 <= n <= kept positions); the rejected drafts after them leave no trace.
        Then forget every kept state."""
        for slot, n in rollbacks:
            if slot not in self.kept or not 1 <= n <= self.kept[slot][0].shape[0]:
                raise RuntimeError(f"no kept DeltaNet state after token {n} of slot {slot}'s last verify "
                                   f"step")
            conv, rec = self.kept[slot]
            self.conv[slot] = conv[n - 1]
            self.recurrent[slot] = rec[n - 1]
        self.kept.clear()


class StateSnapshots:
    """Saved DeltaNet states of one layer for prefix caching: `num` pool entries, each a copy of one
    slot's conv and recurrent state at a point the engine chose (engine/prefix_cache.py). Saving
    copies a slot into an entry; loading copies an entry into a slot, whose sequence then resumes
    from that point as if it had computed the tokens before it. The engine keeps the table of what
    each entry holds; a copy here knows nothing of tokens."""

    def __init__(self, state: DeltaNetState, num: int) -> None:
        if num < 1:
            raise ValueError(f"a snapshot pool needs >= 1 entries, got {num}")
        self.state = state
        self.conv = torch.zeros(num, *state.conv.shape[1:], dtype=state.conv.dtype,
                                device=state.conv.device)  # [J, C, K-1]
        self.recurrent = torch.zeros(num, *state.recurrent.shape[1:], dtype=state.recurrent.dtype,
                                     device=state.recurrent.device)  # [J, Hv, Dk, Dv]

    @property
    def num(self) -> int:
        return self.conv.shape[0]

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.recurrent.nbytes

    def apply(self, saves: Sequence[tuple[int, int]], loads: Sequence[tuple[int, int]]) -> None:
        """Saves ((slot, entry) pairs) first, then loads ((entry, slot) pairs): a state saved by a
        finished sequence can be loaded into a new one, even into the same slot, in one step.
        Entries of `saves` and slots of `loads` are distinct (duplicate indices would race)."""
        if saves:
            slots, entries = self._index([s for s, _ in saves]), self._index([e for _, e in saves])
            self.conv[entries] = self.state.conv[slots]
            self.recurrent[entries] = self.state.recurrent[slots]
        if loads:
            entries, slots = self._index([e for e, _ in loads]), self._index([s for _, s in loads])
            self.state.conv[slots] = self.conv[entries]
            self.state.recurrent[slots] = self.recurrent[entries]

    def _index(self, ids: list[int]) -> Tensor:
        return torch.tensor(ids, dtype=torch.long, device=self.conv.device)
