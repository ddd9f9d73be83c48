"""The KV-cache block manager: a free list over the executor's cache blocks and, per sequence, the
blocks that hold its tokens in order (its block table). A sequence grows its table as it is
scheduled and gives every block back when it finishes or is preempted; a block needs no clearing
when reused (model/cache.py).

Prefix caching: a full block whose tokens are computed can be registered under the chained hash of
its tokens (engine/prefix_cache.py); a later sequence whose prompt starts with the same tokens
takes the registered blocks into its table instead of computing them. Blocks are reference
counted; a registered block no sequence holds stays cached, evictable, and is reused for new
tokens only when no plain free block is left, least recently freed first."""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks of `block_size` tokens that `num_tokens` tokens take."""
    return -(-num_tokens // block_size)


class BlockManager:
    """`num_blocks` None: unlimited, for a model without attention layers (nothing is cached per
    token): it holds no tables, and nothing ever waits or is preempted for want of a block. The
    sizes come checked (SchedulerConfig)."""

    def __init__(self, num_blocks: int | None, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        self._free: deque[int] = deque(range(num_blocks or 0))
        self._tables: dict[Hashable, list[int]] = {}
        self._refs: dict[int, int] = {}  # block -> sequences holding it (held blocks only)
        self._hash_of: dict[int, bytes] = {}  # registered block -> its hash
        self._by_hash: dict[bytes, int] = {}
        # Registered blocks no sequence holds, least recently freed first: reusable, and dropped
        # from the cache when reused.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.num_evictions = 0  # registered blocks reused for other tokens

    @property
    def limited(self) -> bool:
        return self.num_blocks is not None

    @property
    def num_free(self) -> int:
        """Blocks a sequence can take: free ones and cached ones nobody holds (0 for an unlimited
        manager, which has no pool)."""
        return len(self._free) + len(self._evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free if self.limited else 0

    @property
    def num_cached(self) -> int:
        """Registered blocks, held or not."""
        return len(self._by_hash)

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` tokens fits in the whole pool."""
        return not self.limited or blocks_for(num_tokens, self.block_size) <= self.num_blocks

    def can_allocate(self, seq: Hashable, num_tokens: int, cached: Sequence[int] = ()) -> bool:
        """Whether `seq` can hold `num_tokens` tokens (those it has plus those scheduled now); with
        `cached`, the registered blocks it would take first (`take_cached`)."""
        if not self.limited:
            return True
        missing = self._missing(seq, num_tokens) - len(cached)
        unheld = sum(1 for b in cached if b in self._evictable)  # taking them makes them unavailable
        return missing <= self.num_free - unheld

    def allocate(self, seq: Hashable, num_tokens: int) -> None:
        """Grow `seq`'s table to ceil(num_tokens / block_size) blocks; a table never shrinks."""
        missing = self._missing(seq, num_tokens)
        if not self.limited or missing <= 0:
            return
        if missing > self.num_free:
            raise RuntimeError(f"{missing} KV-cache blocks wanted, {self.num_free} free")
        table = self._tables.setdefault(seq, [])
        for _ in range(missing):
            block = self._take_free()
            self._refs[block] = 1
            table.append(block)

    def take_cached(self, seq: Hashable, blocks: Sequence[int]) -> None:
        """Start `seq`'s (empty) table with registered `blocks` (`lookup`), shared, not copied."""
        if self._tables.get(seq):
            raise RuntimeError(f"{seq!r} already holds blocks")
        for b in blocks:
            if b not in self._hash_of:
                raise RuntimeError(f"block {b} is not cached")
            self._evictable.pop(b, None)
            self._refs[b] = self._refs.get(b, 0) + 1
        if blocks:
            self._tables[seq] = list(blocks)

    def free(self, seq: Hashable) -> None:
        """Give back every block of `seq` (none held: nothing to do). Its registered blocks stay
        cached, the last ones first in line for eviction (a longer prefix is shared less)."""
        table = self._tables.pop(seq, [])
        for block in table:
            self._refs[block] -= 1
        for block in reversed(table):
            if self._refs[block] == 0 and block in self._hash_of:
                del self._refs[block]
                self._evictable[block] = None
        for block in table:
            if self._refs.get(block) == 0:
                del self._refs[block]
                self._free.append(block)

    def table(self, seq: Hashable) -> tuple[int, ...]:
        return tuple(self._tables.get(seq, ()))

    # -- prefix caching ------------------------------------------------------------------------
    def lookup(self, hashes: Sequence[bytes]) -> list[int]:
        """The registered blocks of the longest run of `hashes` from the first on."""
        blocks = []
        for h in hashes:
            block = self._by_hash.get(h)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def register(self, seq: Hashable, first: int, hashes: Sequence[bytes]) -> None:
        """Block `first + i` of `seq`'s table now holds computed tokens hashed `hashes[i]`. A hash
        already registered (another sequence computed the same tokens) keeps its block."""
        table = self._tables.get(seq, [])
        for i, h in enumerate(hashes, start=first):
            block = table[i]
            if h in self._by_hash or block in self._hash_of:
                continue
            self._by_hash[h] = block
            self._hash_of[block] = h

    def reset_cache(self) -> None:
        """Forget every registered block (their contents are gone: the executor lost its state);
        blocks nobody holds become plain free blocks. Held blocks stay with their sequences."""
        self._free.extend(self._evictable)
        self._evictable.clear()
        self._by_hash.clear()
        self._hash_of.clear()

    def _take_free(self) -> int:
        if self._free:
            return self._free.popleft()
        block, _ = self._evictable.popitem(last=False)
        del self._by_hash[self._hash_of.pop(block)]
        self.num_evictions += 1
        return block

    def _missing(self, seq: Hashable, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size) - len(self._tables.get(seq, ()))
