"""The KV-cache block manager: tables grow to ceil(tokens / block_size) blocks, never share a
block, give every block back when freed; an unlimited manager (no attention layers) never refuses."""

import pytest

from engine.block_manager import BlockManager, blocks_for
from engine.scheduler import SchedulerConfig


def test_tables_grow_by_whole_blocks_and_free_gives_them_back():
    m = BlockManager(num_blocks=5, block_size=4)
    assert m.limited and m.num_free == 5 and m.num_used == 0
    m.allocate("a", 5)  # 5 tokens: 2 blocks
    assert m.table("a") == (0, 1) and m.num_used == 2
    m.allocate("a", 8)  # still 2 blocks
    assert m.table("a") == (0, 1)
    m.allocate("b", 1)
    m.allocate("a", 9)  # a third block for a, after b's
    assert m.table("a") == (0, 1, 3) and m.table("b") == (2,) and m.num_free == 1
    m.allocate("a", 4)  # a table never shrinks
    assert m.table("a") == (0, 1, 3)
    assert m.can_allocate("b", 8) and not m.can_allocate("b", 9) and not m.can_allocate("c", 5)
    with pytest.raises(RuntimeError, match="2 KV-cache blocks wanted, 1 free"):
        m.allocate("c", 5)
    assert m.table("c") == () and m.num_free == 1  # nothing half-allocated
    m.free("a")
    assert m.table("a") == () and m.num_free == 4 and m.num_used == 1
    m.allocate("c", 16)  # reuses a's blocks, in the order they came back
    assert m.table("c") == (4, 0, 1, 3)
    m.free("nobody")  # holding nothing: nothing to do
    assert sorted(m.table("b") + m.table("c")) == [0, 1, 2, 3, 4]


def test_fits_the_whole_pool():
    m = BlockManager(num_blocks=3, block_size=16)
    assert m.fits(48) and not m.fits(49)
    assert [blocks_for(n, 16) for n in (0, 1, 16, 17)] == [0, 1, 1, 2]


def test_unlimited_manager_never_refuses_and_counts_nothing():
    m = BlockManager(num_blocks=None, block_size=16)
    assert not m.limited and m.fits(10**9) and m.can_allocate("a", 10**9)
    m.allocate("a", 10**9)
    assert m.table("a") == () and m.num_used == 0
    m.free("a")


@pytest.mark.parametrize("num_blocks,block_size,match", [(0, 16, "num_kv_blocks"), (4, 0, "block_size")])
def test_bad_sizes(num_blocks, block_size, match):
    with pytest.raises(ValueError, match=match):  # checked once, where the scheduler's sizes are set
        SchedulerConfig(block_size=block_size, num_kv_blocks=num_blocks)
