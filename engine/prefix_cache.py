"""Prefix caching on the hybrid model: which tokens of a new sequence need not be computed.

A full block of tokens is named by a chained hash (its tokens and the hash of the block before), so
equal hashes mean equal prefixes. Attention layers keep their keys/values per block: the block
manager registers computed blocks under their hashes and shares them (engine/block_manager.py).
A DeltaNet layer keeps one state per sequence, which sums up every token before it; to resume
after a cached prefix, the state at exactly that point must have been saved. This module keeps the
table of saved states (snapshot entries in the executor, model/cache.py StateSnapshots), decides
where to save them and which to load:
- along every prompt, each `state_interval` blocks (chunked prefill ends a chunk there), so
  requests that share a long system prompt resume at the last interval point inside it;
- at its prompt's last block boundary (where the same prompt sent again resumes) when its output
  is too short to reach another;
- at each block boundary its output crosses, one entry per sequence overwritten as it goes: a
  finished request leaves the state at the last boundary of its prompt + output, where the next
  turn of a chat resumes.
A sequence resumes from the longest prefix of whole blocks that has its KV blocks and (for a model
with DeltaNet layers) a saved state at its end, never past its last token, whose logits it needs.
Entries are evicted least recently used. Saves ride on the next step, before its tokens run (the
slot holds the state until then); loads on the step that admits the sequence."""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.sequence import Sequence
from model.config import ModelConfig


def block_hash(parent: bytes, tokens: list[int]) -> bytes:
    """The hash of a full block: its token ids and its parent's hash (b"" for the first block)."""
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


def state_bytes(config: ModelConfig) -> int:
    """Bytes of one snapshot entry: the conv and recurrent state of every DeltaNet layer."""
    c = config
    conv = c.linear_conv_dim * (c.linear_conv_kernel_dim - 1) * c.torch_dtype.itemsize
    recurrent = c.linear_num_value_heads * c.linear_key_head_dim * c.linear_value_head_dim * 4  # float32
    return len(c.deltanet_layers) * (conv + recurrent)


@dataclass(frozen=True)
class Hit:
    """`num_blocks` leading blocks of a sequence are cached: `blocks` (its KV blocks; () without a
    paged KV cache) and, for a model with DeltaNet layers, the snapshot entry `entry` after them."""

    num_blocks: int
    blocks: tuple[int, ...]
    entry: int | None


class PrefixCache:
    def __init__(self, blocks: BlockManager, block_size: int, num_states: int, needs_state: bool,
                 state_interval: int) -> None:
        """`num_states`: snapshot entries the executor keeps; `needs_state`: the model has DeltaNet
        layers, so a hit needs a saved state; `state_interval`: blocks between the saves along a
        prompt."""
        if state_interval < 1:
            raise ValueError(f"state_interval must be >= 1, got {state_interval}")
        self.blocks, self.block_size = blocks, block_size
        self.num_states, self.needs_state, self.state_interval = num_states, needs_state, state_interval
        self._entry_of: OrderedDict[bytes, int] = OrderedDict()  # hash -> entry, least recent first
        self._free_entries = list(range(num_states))
        self._saves: dict[int, int] = {}  # entry -> slot, saved before the next step's tokens run
        self._loads: list[tuple[int, int]] = []  # (entry, slot) for the step being scheduled
        self._rolling: dict[Sequence, bytes] = {}  # a sequence's overwritten entry, by its hash now
        self.queried_tokens = 0  # tokens of admitted sequences looked up
        self.hit_tokens = 0  # of those, tokens found cached (not computed)
        self.state_evictions = 0

    @property
    def num_states_held(self) -> int:
        return len(self._entry_of)

    def hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The chained hashes of `seq`'s full blocks, at least its first `num_blocks` (the list kept
        on the sequence, computed as far as asked)."""
        bs, h = self.block_size, seq.block_hashes
        while len(h) < num_blocks:
            i = len(h)
            h.append(block_hash(h[-1] if h else b"", seq.token_slice(i * bs, (i + 1) * bs)))
        return h

    # -- admission -----------------------------------------------------------------------------
    def match(self, seq: Sequence) -> Hit | None:
        """The longest cached prefix `seq` can resume from, or None. The last token is always
        computed (its logits sample the next one), and a request that scores its prompt
        (prompt_logprobs) needs every position's logits, so it computes them all."""
        if seq.params.prompt_logprobs is not None:
            return None
        most = (seq.num_tokens - 1) // self.block_size
        hashes = self.hashes(seq, most)[:most]
        cached = self.blocks.lookup(hashes) if self.blocks.limited else []
        k = len(cached) if self.blocks.limited else len(hashes)
        if self.needs_state:
            while k > 0 and hashes[k - 1] not in self._entry_of:
                k -= 1
        if k == 0:
            return None
        return Hit(k, tuple(cached[:k]), self._entry_of.get(hashes[k - 1]) if self.needs_state else None)

    def resume(self, seq: Sequence, hit: Hit | None) -> None:
        """`seq` was admitted (it has its slot) with `hit`: take the blocks, load the state."""
        self.queried_tokens += seq.num_tokens
        if hit is None:
            return
        self.blocks.take_cached(seq, hit.blocks)
        if hit.entry is not None:
            self._entry_of.move_to_end(seq.block_hashes[hit.num_blocks - 1])
            self._loads.append((hit.entry, seq.slot))
        seq.num_registered_blocks = hit.num_blocks
        seq.num_computed_tokens = seq.num_cached_tokens = hit.num_blocks * self.block_size
        self.hit_tokens += seq.num_cached_tokens

    def chunk_limit(self, seq: Sequence, start: int, num_tokens: int) -> int:
        """`num_tokens` from `start`, or fewer so the chunk ends where a state is saved: the next
        interval point, or the last block boundary of the sequence's tokens where its output will
        cross no later one (else the output's boundary is saved, which costs no extra step; an
        extra step of a few tokens costs about a decode step, a fixed cost that would eat much of
        a chat turn's gain)."""
        if not (self.needs_state and self.num_states) or num_tokens <= 1:
            return num_tokens
        bs, end, interval = self.block_size, start + num_tokens, self.state_interval * self.block_size
        points = [(start // interval + 1) * interval]
        last = seq.num_tokens // bs * bs
        if (seq.num_prompt_tokens + seq.params.max_tokens - 1) // bs * bs <= last:
            points.append(last)
        inside = [p for p in points if start < p < end]
        return min(inside) - start if inside else num_tokens

    # -- after a step --------------------------------------------------------------------------
    def computed(self, seq: Sequence) -> None:
        """`seq`'s computed tokens grew (a step went through): register its newly full blocks, and
        save its state if it stands at a snapshot point."""
        c, bs = seq.num_computed_tokens, self.block_size
        full = c // bs
        if full > seq.num_registered_blocks and self.blocks.limited:
            hashes = self.hashes(seq, full)
            self.blocks.register(seq, seq.num_registered_blocks, hashes[seq.num_registered_blocks:full])
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)
        if not (self.needs_state and self.num_states) or c == 0 or c % bs:
            return
        h = self.hashes(seq, full)[full - 1]
        previous = self._rolling.pop(seq, None)
        if h in self._entry_of:  # saved already (e.g. the same prompt ran before)
            self._entry_of.move_to_end(h)
            return
        # Interval points and the prompt's last boundary (where the same prompt sent again
        # resumes) get an entry of their own; later boundaries overwrite the sequence's last one.
        if full % self.state_interval == 0 or c == seq.num_prompt_tokens // bs * bs:
            entry = self._new_entry()
            if previous is not None:
                self._rolling[seq] = previous  # still this sequence's to overwrite
        elif previous is not None and previous in self._entry_of:
            entry = self._entry_of.pop(previous)  # overwritten: the older boundary is passed
            self._rolling[seq] = h
        else:
            entry = self._new_entry()
            self._rolling[seq] = h
        if entry is None:
            self._rolling.pop(seq, None)
            return
        self._entry_of[h] = entry
        self._saves[entry] = seq.slot

    def forget(self, seq: Sequence) -> None:
        """`seq` gave back its slot (finished or preempted): its last saved state stays cached, and
        is no longer overwritten; its table is rebuilt when it runs again."""
        self._rolling.pop(seq, None)
        seq.num_registered_blocks = 0

    def take_ops(self) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
        """The step's (slot, entry) saves and (entry, slot) loads, which the executor runs before
        the step's tokens."""
        saves = tuple((slot, entry) for entry, slot in self._saves.items())
        loads = tuple(self._loads)
        self._saves.clear()
        self._loads.clear()
        return saves, loads

    # -- failures ------------------------------------------------------------------------------
    def discard(self, saves: tuple[tuple[int, int], ...]) -> None:
        """The step carrying `saves` failed: whether they ran is unknown, so their entries go."""
        lost = {entry for _, entry in saves}
        for h, entry in list(self._entry_of.items()):
            if entry in lost:
                del self._entry_of[h]
                self._free_entries.append(entry)

    def invalidate(self) -> None:
        """The executor lost its state (an actor restarted): no saved state or cached block can be
        trusted; those sequences still hold must be recomputed (the caller resets them)."""
        self._entry_of.clear()
        self._free_entries = list(range(self.num_states))
        self._saves.clear()
        self._loads.clear()
        self._rolling.clear()
        self.blocks.reset_cache()

    def _new_entry(self) -> int | None:
        """A free entry, or the least recently used one, evicted; None when there are none."""
        if self._free_entries:
            return self._free_entries.pop()
        if not self._entry_of:
            return None
        h, entry = self._entry_of.popitem(last=False)
        self._saves.pop(entry, None)  # its pending save is moot
        for seq, rolled in list(self._rolling.items()):
            if rolled == h:
                del self._rolling[seq]
        self.state_evictions += 1
        return entry
