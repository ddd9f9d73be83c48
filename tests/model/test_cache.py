"""The paged KV cache: keys/values written through shuffled, non-contiguous block tables read back
exactly as a contiguous per-sequence buffer holds them, step after step (prefill chunks and
decodes mixed); a bad table is an error, never a write into another sequence's blocks. And the
DeltaNet state read: fresh sequences start from zeros, the store itself is never touched."""

from __future__ import annotations

import pytest
import torch

from model.batch import BatchLayout
from model.cache import DeltaNetState, KVCache

NKV, D = 2, 3
# (start, new tokens) per sequence and step: chunked prefills, decodes and a one-token prompt.
STEPS = [[(0, 5), (0, 9), (0, 1)], [(5, 4), (9, 1), (1, 1)], [(9, 1), (10, 7), (2, 1)],
         [(10, 1), (17, 1), (3, 6)]]


def random_tables(num_seqs: int, blocks_each: int, num_blocks: int, seed: int) -> list[list[int]]:
    ids = torch.randperm(num_blocks, generator=torch.Generator().manual_seed(seed)).tolist()
    return [ids[b * blocks_each:(b + 1) * blocks_each] for b in range(num_seqs)]


def run(cache: KVCache, tables: list[list[int]] | None, slots: list[int]):
    """Write random keys/values step by step; per step, what read() returns and the reference
    (a contiguous [B, 32, Nkv, D] buffer per sequence)."""
    g = torch.Generator().manual_seed(0)
    ref_k, ref_v = torch.zeros(len(slots), 32, NKV, D), torch.zeros(len(slots), 32, NKV, D)
    results = []
    for step in STEPS:
        starts, lengths = [s for s, _ in step], [n for _, n in step]
        layout = BatchLayout.build(slots, starts, lengths, block_tables=tables)
        k, v = torch.randn(sum(lengths), NKV, D, generator=g), torch.randn(sum(lengths), NKV, D, generator=g)
        seq_of_token = torch.arange(len(slots)).repeat_interleave(layout.lengths)
        ref_k[seq_of_token, layout.positions], ref_v[seq_of_token, layout.positions] = k, v
        cache.write(layout, k, v)
        results.append((layout, *cache.read(layout), ref_k.clone(), ref_v.clone()))
    return results


def assert_valid_equal(results):
    for layout, keys, values, ref_k, ref_v in results:
        ends = (layout.starts + layout.lengths).tolist()
        assert keys.shape == (3, max(ends), NKV, D)
        for b, end in enumerate(ends):  # positions past a sequence's end are masked by attention
            assert torch.equal(keys[b, :end], ref_k[b, :end])
            assert torch.equal(values[b, :end], ref_v[b, :end])


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_shuffled_block_tables_read_back_the_contiguous_result(block_size):
    blocks_each = -(-32 // block_size)
    num_blocks = 3 * blocks_each + 5  # spare blocks nobody owns
    cache = KVCache(num_slots=3, max_len=32, num_kv_heads=NKV, head_dim=D, dtype=torch.float32,
                    block_size=block_size, num_blocks=num_blocks)
    tables = random_tables(3, blocks_each, num_blocks, seed=block_size)
    assert not all(t == list(range(t[0], t[0] + len(t))) for t in tables)  # not slot-contiguous
    assert_valid_equal(run(cache, tables, slots=[2, 0, 1]))
    # The default tables of a layout without any: today's slot-contiguous cache.
    default = KVCache(3, 32, NKV, D, torch.float32, block_size=block_size)
    assert default.num_blocks == 3 * blocks_each
    assert_valid_equal(run(default, None, slots=[2, 0, 1]))


def test_tables_are_what_places_the_tokens():
    """Two sequences with swapped tables exchange their caches: the table, not the slot, decides."""
    cache = KVCache(2, 8, NKV, D, torch.float32, block_size=4, num_blocks=4)
    k = torch.randn(8, NKV, D)
    cache.write(BatchLayout.build([0, 1], [0, 0], [4, 4], block_tables=[[3], [0]]), k, k)
    keys, _ = cache.read(BatchLayout.build([1, 0], [3, 3], [1, 1], block_tables=[[3], [0]]))
    assert torch.equal(keys[0, :3], k[:3]) and torch.equal(keys[1, :3], k[4:7])
    assert torch.equal(cache.k[3], k[:4]) and torch.equal(cache.k[0], k[4:])


def test_bad_tables_are_errors():
    cache = KVCache(2, 8, NKV, D, torch.float32, block_size=4, num_blocks=3)
    kv = torch.zeros(5, NKV, D)
    with pytest.raises(ValueError, match="runs past its block table"):  # 5 tokens, 1 block of 4
        cache.write(BatchLayout.build([0], [0], [5], block_tables=[[1]]), kv, kv)
    with pytest.raises(ValueError, match="more than its block table"):  # padded shorter table
        cache.write(BatchLayout.build([0, 1], [0, 0], [4, 5], block_tables=[[0, 1], [2]]),
                    torch.zeros(9, NKV, D), torch.zeros(9, NKV, D))
    with pytest.raises(ValueError, match=r"block ids \[3\] outside the cache's 0..2"):
        cache.write(BatchLayout.build([0], [0], [5], block_tables=[[0, 3]]), kv, kv)
    with pytest.raises(ValueError, match="default per-slot tables"):  # 2 slots x 2 blocks > 3 blocks
        cache.write(BatchLayout.build([0], [0], [5]), kv, kv)
    assert not cache.k.any()  # nothing was written by any of them
    with pytest.raises(ValueError, match="block ids must be >= 0"):
        BatchLayout.build([0], [0], [5], block_tables=[[0, -1]])
    with pytest.raises(ValueError, match="2 block tables for 1 sequences"):
        BatchLayout.build([0], [0], [5], block_tables=[[0], [1]])
    with pytest.raises(ValueError, match="at least one block"):
        BatchLayout.build([0], [0], [5], block_tables=[[]])
    with pytest.raises(ValueError, match="exceeds the cache length 8"):
        KVCache(2, 8, NKV, D, torch.float32, block_size=4).write(
            BatchLayout.build([0], [6], [3]), torch.zeros(3, NKV, D), torch.zeros(3, NKV, D))


def test_layout_to_keeps_block_tables():
    layout = BatchLayout.build([0, 1], [0, 2], [3, 1], block_tables=[[4, 2], [7]])
    assert layout.block_tables.tolist() == [[4, 2], [7, -1]]
    moved = layout.to("cpu")
    assert torch.equal(moved.block_tables, layout.block_tables) and torch.equal(moved.slots, layout.slots)
    assert BatchLayout.build([0], [0], [1]).to("cpu").block_tables is None


def test_caches_of_different_shapes_share_a_layout():
    """The checked tables are kept with the layout, per cache shape: layers of different block
    sizes stepping through one layout each find their own."""
    layout = BatchLayout.build([1, 0], [0, 0], [6, 3])
    kv = torch.randn(9, NKV, D)
    caches = [KVCache(2, 8, NKV, D, torch.float32, block_size=bs) for bs in (4, 16, 4)]
    for c in caches:
        c.write(layout, kv, kv)
    assert len(layout.derived) == 2  # block sizes 4 and 16
    for c in caches:
        keys, _ = c.read(layout)
        assert torch.equal(keys[0, :6], kv[:6]) and torch.equal(keys[1, :3], kv[6:])


def test_deltanet_state_read_zeroes_only_fresh_sequences_and_never_the_store():
    state = DeltaNetState(3, conv_dim=4, conv_kernel=3, num_v_heads=2, k_head_dim=3, v_head_dim=2,
                          dtype=torch.float32)
    state.conv.normal_()
    state.recurrent.normal_()
    stored = state.conv.clone(), state.recurrent.clone()
    conv, rec = state.read(BatchLayout.build([2, 0], [0, 5], [3, 1]))  # slot 2 starts now
    assert not conv[0].any() and not rec[0].any()
    assert torch.equal(conv[1], stored[0][0]) and torch.equal(rec[1], stored[1][0])
    conv, rec = state.read(BatchLayout.build([1, 2], [4, 9], [1, 1]))  # decode: no fresh sequence
    assert torch.equal(conv, stored[0][[1, 2]]) and torch.equal(rec, stored[1][[1, 2]])
    assert torch.equal(state.conv, stored[0]) and torch.equal(state.recurrent, stored[1])
