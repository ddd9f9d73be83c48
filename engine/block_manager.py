"""The KV-cache block manager: a free list over the executor's cache blocks and, per sequence, the
blocks that hold its tokens in order (its block table). A sequence grows its table as it is
scheduled and gives every block back when it finishes or is preempted; a block needs no clearing
when reused (model/cache.py)."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable


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

    @property
    def limited(self) -> bool:
        return self.num_blocks is not None

    @property
    def num_free(self) -> int:
        """Free blocks (0 for an unlimited manager, which has no pool)."""
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free) if self.limited else 0

    def fits(self, num_tokens: int) -> bool:
        """Whether a sequence of `num_tokens` tokens fits in the whole pool."""
        return not self.limited or blocks_for(num_tokens, self.block_size) <= self.num_blocks

    def can_allocate(self, seq: Hashable, num_tokens: int) -> bool:
        """Whether `seq` can hold `num_tokens` tokens (those it has plus those scheduled now)."""
        return not self.limited or self._missing(seq, num_tokens) <= len(self._free)

    def allocate(self, seq: Hashable, num_tokens: int) -> None:
        """Grow `seq`'s table to ceil(num_tokens / block_size) blocks; a table never shrinks."""
        missing = self._missing(seq, num_tokens)
        if not self.limited or missing <= 0:
            return
        if missing > len(self._free):
            raise RuntimeError(f"{missing} KV-cache blocks wanted, {len(self._free)} free")
        self._tables.setdefault(seq, []).extend(self._free.popleft() for _ in range(missing))

    def free(self, seq: Hashable) -> None:
        """Give back every block of `seq` (none held: nothing to do)."""
        self._free.extend(self._tables.pop(seq, ()))

    def table(self, seq: Hashable) -> tuple[int, ...]:
        return tuple(self._tables.get(seq, ()))

    def _missing(self, seq: Hashable, num_tokens: int) -> int:
        return blocks_for(num_tokens, self.block_size) - len(self._tables.get(seq, ()))
