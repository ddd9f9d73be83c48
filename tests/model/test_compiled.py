"""The compiled decode step against eager, the reference: logits within the README's float32
tolerance and the same greedy tokens on both tiny architectures, through shuffled block tables,
a batch of 3 padded to the bucket of 4 (its padded row must touch no real cache), slots reused by
one-token prompts, and context lengths across the granule without a recompile. One compile per
architecture (the module's fixture); the one-token delta-rule step against the recurrence."""

from __future__ import annotations

import threading

import pytest
import torch
from torch._dynamo.utils import counters

from model.batch import BatchLayout
from model.cache import DeltaNetState, KVCache
from model.compiled import CompiledDecode, DecodePadding
from model.decode_math import (
    DecodeInputs,
    default_buckets,
    delta_rule_decode,
    make_decode_caches,
    state_tensors,
)
from model.decoder import CausalLM
from model.delta_rule import gated_delta_rule_step, recurrent_gated_delta_rule
from model.gated_deltanet import l2norm

# The shapes of tests/engine/test_compiled_executor.py's executor, so that it reuses these compiles.
NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS = 4, 64, 8, 32
PROMPTS = {2: [5, 9, 13, 2, 77, 31, 8], 0: [101, 7], 3: [3, 3, 3, 250, 17, 44, 12, 90, 6, 6, 200]}


@pytest.fixture(scope="module", params=["qwen3_next", "qwen3_moe"])
def model(request, tmp_path_factory):
    from model.tiny import make_tiny_model

    path = make_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param)
    return CausalLM.from_pretrained(path)


def tables(seed: int) -> dict[int, list[int]]:
    """Shuffled, non-contiguous block tables of 8 blocks per slot."""
    ids = torch.randperm(NUM_BLOCKS, generator=torch.Generator().manual_seed(seed)).tolist()
    return {s: ids[8 * s:8 * s + 8] for s in range(NUM_SLOTS)}


def assert_close_logits(eager: torch.Tensor, compiled: torch.Tensor) -> None:
    """The README's float32 tolerance; greedy tokens equal wherever the top two are not a near-tie."""
    scale = eager.abs().max().item()
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-4 * scale)
    top2 = eager.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 1e-3
    assert torch.equal(compiled.argmax(-1)[clear], eager.argmax(-1)[clear])


def test_compiled_decode_matches_eager(model):
    eager_caches = make_decode_caches(model, NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS)
    caches = make_decode_caches(model, NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS)
    decode = CompiledDecode(model, caches, NUM_SLOTS, NUM_BLOCKS, buckets=(4,))
    table = tables(seed=1)
    seqs = {s: list(p) for s, p in PROMPTS.items()}  # slot -> tokens so far
    with torch.inference_mode():  # the prompts, eagerly into both caches
        slots = list(seqs)
        layout = BatchLayout.build(slots, [0] * 3, [len(seqs[s]) for s in slots],
                                   block_tables=[table[s] for s in slots])
        ids = torch.tensor([t for s in slots for t in seqs[s]])
        hidden = model(ids, layout, eager_caches)
        model(ids, layout, caches)
        for s, t in zip(slots, model.compute_logits(hidden[layout.last_token_index()]).argmax(-1).tolist(),
                        strict=True):
            seqs[s].append(t)

    graphs = None
    for step in range(12):
        if step == 6:  # slot 0 ends; it and the free slot 1 start one-token prompts on stale blocks
            del seqs[0]
            seqs[0], seqs[1] = [42], [7]
            table = {**table, 0: table[0][::-1], 1: table[1]}
        slots = sorted(seqs)
        starts = [len(seqs[s]) - 1 for s in slots]
        layout = BatchLayout.build(slots, starts, [1] * len(slots), block_tables=[table[s] for s in slots])
        ids = torch.tensor([seqs[s][-1] for s in slots])
        assert decode.supports(layout) and decode.bucket(len(slots)) == 4
        with torch.inference_mode():
            expected = model.compute_logits(model(ids, layout, eager_caches))
        got = model.compute_logits(decode(ids, layout))
        assert_close_logits(expected, got)
        for s, t in zip(slots, expected.argmax(-1).tolist(), strict=True):
            seqs[s].append(t)
        if graphs is None:
            graphs = counters["stats"]["unique_graphs"]
    # Context lengths grew across the 16-key granule (up to 18 tokens) without a recompile.
    assert max(len(t) for t in seqs.values()) > 16
    assert counters["stats"]["unique_graphs"] == graphs
    # Real slots' states equal eager's; the padded row wrote only the scratch slot.
    for e, c in zip(eager_caches, caches, strict=True):
        if isinstance(c, DeltaNetState):
            torch.testing.assert_close(c.recurrent[:NUM_SLOTS], e.recurrent[:NUM_SLOTS], rtol=0, atol=1e-5)
            torch.testing.assert_close(c.conv[:NUM_SLOTS], e.conv[:NUM_SLOTS], rtol=0, atol=1e-5)


def test_decode_inputs_from_lists_equal_the_layouts(model):
    """step_inputs (the local executor's decode steps, no BatchLayout) against inputs(layout): the
    same rows, keys read where the row has them and the scratch row past its end; bad tables and
    a slot twice refused."""
    padding = DecodePadding(make_decode_caches(model, NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS), NUM_SLOTS,
                            NUM_BLOCKS)
    table = tables(seed=3)
    slots, starts = [2, 0, 3], [17, 0, 9]
    layout = BatchLayout.build(slots, starts, [1, 1, 1], block_tables=[table[s] for s in slots])
    want = padding.inputs(layout, 4)
    got = padding.step_inputs(slots, starts, [table[s] for s in slots], 4, "cpu")
    for name in ("positions", "slots", "fresh", "write_at", "kv_len"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert got.read_at.shape == want.read_at.shape
    seen = torch.arange(want.read_at.shape[1])[None, :] < want.kv_len[:, None]
    assert torch.equal(got.read_at[seen], want.read_at[seen])
    assert bool((got.read_at[~seen] == padding.scratch_row).all())
    with pytest.raises(ValueError, match="more than its block table"):
        padding.step_inputs(slots, [17, 0, 70], [table[s] for s in slots], 4, "cpu")
    with pytest.raises(ValueError, match="outside the cache"):
        padding.step_inputs(slots, starts, [table[2], table[0], [NUM_BLOCKS, *table[3][1:]]], 4, "cpu")
    with pytest.raises(ValueError, match="twice"):
        padding.step_inputs([2, 2], [3, 4], [table[2], table[2]], 2, "cpu")


def test_warm_up_touches_only_the_scratch_room(model):
    """Warming up (and a CUDA graph's capture) runs steps of padded rows only."""
    caches = make_decode_caches(model, NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS)
    g = torch.Generator().manual_seed(0)
    # (tensor, rows the engine hands out: all but the scratch block / slot)
    tensors = [(t, NUM_BLOCKS if isinstance(c, KVCache) else NUM_SLOTS)
               for c in caches for t in state_tensors(c)]
    for t, _ in tensors:
        t.copy_(torch.randn(t.shape, generator=g))
    before = [t.clone() for t, _ in tensors]
    decode = CompiledDecode(model, caches, NUM_SLOTS, NUM_BLOCKS, buckets=(4,))
    decode.warm_up()
    assert set(decode.compile_seconds) == {4}
    for (t, real), b in zip(tensors, before, strict=True):
        assert torch.equal(t[:real], b[:real])
    assert not all(torch.equal(t, b) for (t, _), b in zip(tensors, before, strict=True))


def test_what_the_compiled_step_takes(model):
    caches = make_decode_caches(model, NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS)
    decode = CompiledDecode(model, caches, NUM_SLOTS, NUM_BLOCKS, buckets=(1, 2))
    assert decode.supports(BatchLayout.build([0, 1], [5, 0], [1, 1]))
    assert not decode.supports(BatchLayout.build([0, 1], [5, 0], [1, 3]))  # a prefill: eager
    assert not decode.supports(BatchLayout.build([0, 1, 2], [5, 5, 5], [1, 1, 1]))  # past the buckets
    with pytest.raises(ValueError, match="make_decode_caches"):
        CompiledDecode(model, model.make_caches(NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS), NUM_SLOTS, NUM_BLOCKS)
    assert default_buckets(1) == (1,) and default_buckets(16) == (1, 2, 4, 8, 16)
    assert default_buckets(12) == (1, 2, 4, 8, 12)


def test_delta_rule_step_matches_recurrence():
    g = torch.Generator().manual_seed(0)
    B, H, K, V = 3, 4, 16, 8
    q = torch.nn.functional.normalize(torch.randn(B, H, K, generator=g), dim=-1)
    k = torch.nn.functional.normalize(torch.randn(B, H, K, generator=g), dim=-1)
    v = torch.randn(B, H, V, generator=g)
    decay, beta = -torch.rand(B, H, generator=g), torch.rand(B, H, generator=g)
    state = torch.randn(B, H, K, V, generator=g)
    o, s = gated_delta_rule_step(q, k, v, decay, beta, state)
    o_ref, s_ref = recurrent_gated_delta_rule(q[:, None], k[:, None], v[:, None], decay[:, None],
                                              beta[:, None], state)
    torch.testing.assert_close(o, o_ref[:, 0], rtol=0, atol=2e-5)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("rows", [2, 5])  # 2 of 7 slots: scattered back; 5: every slot in place
def test_decode_delta_rule_on_the_cache_matches_the_step(rows):
    """delta_rule_decode (un-normed q, k of G key heads; the states read and written in the cache)
    against gated_delta_rule_step on the gathered, normed inputs: the rows' outputs and states,
    a fresh row starting from zeros, and every slot no row holds left bit for bit."""
    g = torch.Generator().manual_seed(rows)
    n, G, H, K, V = 7, 2, 4, 16, 8
    slots = torch.tensor([5, 1, 3, 0, 6][:rows])
    fresh = torch.tensor([False, True, False, False, False][:rows])
    q, k = torch.randn(rows, G, K, generator=g), torch.randn(rows, G, K, generator=g)
    v = torch.randn(rows, H, V, generator=g)
    decay, beta = -torch.rand(rows, H, generator=g), torch.rand(rows, H, generator=g)
    recurrent = torch.randn(n, H, K, V, generator=g)
    before = recurrent.clone()
    zeros = torch.zeros(rows, dtype=torch.long)
    inp = DecodeInputs(positions=zeros, slots=slots, fresh=fresh, write_at=zeros, read_at=zeros[:, None],
                       kv_len=zeros + 1)
    o = delta_rule_decode(q, k, v, decay, beta, inp, recurrent)

    def normed(x):
        return l2norm(x).repeat_interleave(H // G, dim=1)

    state = torch.where(fresh[:, None, None, None], 0, before[slots])
    o_ref, s_ref = gated_delta_rule_step(normed(q), normed(k), v, decay, beta, state)
    torch.testing.assert_close(o, o_ref, rtol=0, atol=2e-5)
    torch.testing.assert_close(recurrent[slots], s_ref, rtol=0, atol=2e-5)
    others = [s for s in range(n) if s not in slots.tolist()]
    assert torch.equal(recurrent[others], before[others])


def test_fixed_key_width_of_cuda_graphs_matches_eager_on_cpu(model):
    """What a CUDA graph replays, without the graph: every row reads keys up to the cache's
    max_len (padded rows and keys past a row's end point at the scratch row, masked by kv_len)."""
    if model.config.arch != "qwen3_next":
        pytest.skip("one compile suffices: qwen3_next has both token mixers")
    eager_caches = make_decode_caches(model, NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS)
    caches = make_decode_caches(model, NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS)
    decode = CompiledDecode(model, caches, NUM_SLOTS, NUM_BLOCKS, buckets=(4,), static_kv_width=True)
    assert decode.kv_width == MAX_LEN and not decode.cuda_graphs
    table = tables(seed=2)
    seqs = {s: list(PROMPTS[s]) for s in (0, 2, 3)}
    with torch.inference_mode():
        slots = list(seqs)
        layout = BatchLayout.build(slots, [0] * 3, [len(seqs[s]) for s in slots],
                                   block_tables=[table[s] for s in slots])
        ids = torch.tensor([t for s in slots for t in seqs[s]])
        model(ids, layout, eager_caches)
        model(ids, layout, caches)
    for step in range(4):
        slots = sorted(seqs)
        layout = BatchLayout.build(slots, [len(seqs[s]) - 1 for s in slots], [1] * 3,
                                   block_tables=[table[s] for s in slots])
        inp = decode.inputs(layout, decode.bucket(3))
        if step == 0:  # the padded inputs the graph's static buffers receive
            scratch_row = NUM_BLOCKS * BLOCK
            assert decode.bucket(3) == 4 and inp.read_at.shape == (4, MAX_LEN)
            assert inp.slots[3] == NUM_SLOTS and bool(inp.fresh[3]) and inp.kv_len[3] == 1
            assert bool((inp.read_at[3] == scratch_row).all()) and inp.write_at[3] == scratch_row
            assert inp.kv_len[:3].tolist() == [len(seqs[s]) for s in slots]
            longest = max(len(seqs[s]) for s in slots)  # keys past it are padding: the scratch row
            assert bool((inp.read_at[:, longest:] == scratch_row).all())
        ids = torch.tensor([seqs[s][-1] for s in slots])
        with torch.inference_mode():
            expected = model.compute_logits(model(ids, layout, eager_caches))
        assert_close_logits(expected, model.compute_logits(decode(ids, layout)))
        for s, t in zip(slots, expected.argmax(-1).tolist(), strict=True):
            seqs[s].append(t)
    with pytest.raises(ValueError, match="CUDA device"):
        CompiledDecode(model, caches, NUM_SLOTS, NUM_BLOCKS, cuda_graphs=True)


def test_grouped_decode_experts_equal_the_gathered_ones():
    """The compiled step's grouped-GEMM experts (its CUDA choice), run eagerly here: the same sum
    as each row gathering its own experts, pairs of experts held elsewhere weighing nothing."""
    from model.decode_math import _gathered_experts, grouped_experts
    from model.moe import Experts

    if not hasattr(torch.nn.functional, "grouped_mm"):
        pytest.skip("this torch has no grouped_mm")
    g = torch.Generator().manual_seed(0)
    ex = Experts(24, 16, range(6), 6)
    with torch.no_grad():
        ex.gate_up.copy_(torch.randn(ex.gate_up.shape, generator=g))
        ex.down.copy_(torch.randn(ex.down.shape, generator=g))
    x = torch.randn(5, 24, generator=g)
    j = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(5)])
    w = torch.rand(5, 3, generator=g)
    w[1, 2] = 0  # a pair whose expert is held elsewhere (run on stacked expert j, weighted 0)
    with torch.no_grad():
        want = _gathered_experts(ex, x, j, w)
        got = grouped_experts(ex, x, j, w)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * want.abs().max().item())


def test_background_compile_steps_eagerly_until_its_bucket_is_ready(model):
    """`compile_in_background`: steps run eagerly (the caller's fallback) while the bucket
    compiles in its thread, on scratch rows only, then through the graph; every step's logits
    and the real slots' states equal an eager-only run's."""
    eager_caches = make_decode_caches(model, NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS)
    caches = make_decode_caches(model, NUM_SLOTS, MAX_LEN, BLOCK, NUM_BLOCKS)
    decode = CompiledDecode(model, caches, NUM_SLOTS, NUM_BLOCKS, buckets=(4,))
    table = tables(seed=2)
    seqs = {s: list(p) for s, p in PROMPTS.items()}
    slots = sorted(seqs)
    with torch.inference_mode():
        layout = BatchLayout.build(slots, [0] * 3, [len(seqs[s]) for s in slots],
                                   block_tables=[table[s] for s in slots])
        ids = torch.tensor([t for s in slots for t in seqs[s]])
        model(ids, layout, caches)
        hidden = model(ids, layout, eager_caches)
        for s, t in zip(slots, model.compute_logits(hidden[layout.last_token_index()]).argmax(-1).tolist(),
                        strict=True):
            seqs[s].append(t)

    def step() -> bool:
        layout = BatchLayout.build(slots, [len(seqs[s]) - 1 for s in slots], [1] * 3,
                                   block_tables=[table[s] for s in slots])
        ids = torch.tensor([seqs[s][-1] for s in slots])
        compiled = decode.supports(layout)
        with torch.inference_mode():
            expected = model.compute_logits(model(ids, layout, eager_caches))
            got = model.compute_logits(decode(ids, layout) if compiled else model(ids, layout, caches))
        assert_close_logits(expected, got)
        for s, t in zip(slots, expected.argmax(-1).tolist(), strict=True):
            seqs[s].append(t)
        return compiled

    # The bucket's compile waits until a step has run eagerly (in this process another test may
    # have compiled the same graph already, which would make it instant).
    gate, compile_step = threading.Event(), decode._step
    decode._step = lambda *a: gate.wait(60) and compile_step(*a)
    thread = decode.compile_in_background()
    assert decode.compiling and not step()  # no bucket ready: this step ran eagerly
    gate.set()
    while decode.compiling and len(seqs[0]) < 40:
        step()
    thread.join(timeout=600)
    assert not decode.compiling and decode.background_error is None
    assert set(decode.compile_seconds) == {4} and decode.bucket(3) == 4
    assert all(step() for _ in range(3))  # now through the graph (the unsafe stance: compile done)
    for e, c in zip(eager_caches, caches, strict=True):
        if isinstance(c, DeltaNetState):
            torch.testing.assert_close(c.recurrent[:NUM_SLOTS], e.recurrent[:NUM_SLOTS], rtol=0, atol=1e-5)
        else:
            torch.testing.assert_close(c.k[:NUM_BLOCKS], e.k[:NUM_BLOCKS], rtol=0, atol=1e-5)
