"""Prefix caching (engine/prefix_cache.py, engine/block_manager.py): the pieces on their own, then
the engine over the local executor and the tiny float32 models, where every workload's greedy
tokens must equal those of the same engine without the cache and its logprobs agree within the
README's chunking tolerance (5e-4 relative: a cached prefix was computed in other chunks)."""

from __future__ import annotations

import random

import pytest
import torch

from engine.block_manager import BlockManager
from engine.executor import ExecutorStateLostError, StepInput
from engine.llm_engine import Completion, LLMEngine
from engine.local_executor import LocalExecutor
from engine.prefix_cache import PrefixCache, block_hash, state_bytes
from engine.sampling import SamplingParams
from engine.sequence import Sequence
from model.cache import DeltaNetState

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=True)
BS = 4  # tokens per block: short prompts span many blocks


# -- the pieces ---------------------------------------------------------------------------------
def test_block_hashes_chain_over_the_parent():
    a, b = block_hash(b"", [1, 2, 3, 4]), block_hash(b"", [1, 2, 3, 5])
    assert a != b and block_hash(b"", [1, 2, 3, 4]) == a
    assert block_hash(a, [9, 9, 9, 9]) != block_hash(b, [9, 9, 9, 9])  # same block, other prefix


def test_cached_blocks_are_shared_counted_and_evicted_least_recent_first():
    m = BlockManager(6, BS)
    h = [bytes([i]) * 32 for i in range(6)]
    m.allocate("a", 12)
    m.register("a", 0, h[:3])
    assert m.lookup(h) == list(m.table("a")) and m.num_cached == 3
    m.take_cached("b", m.lookup(h[:2]))  # shared, not copied
    m.allocate("b", 10)
    assert m.table("b")[:2] == m.table("a")[:2] and m.num_used == 4
    m.free("a")  # a's first two blocks are still b's; its third stays cached, nobody holding it
    assert m.num_used == 3 and m.num_free == 3 and m.lookup(h) == [*m.table("b")[:2], 2]
    assert m.can_allocate("c", 12, m.lookup(h[:3]))  # 3 cached (one unheld) + 0 new
    assert m.can_allocate("c", 20, m.lookup(h[:3]))  # + 2 new: the 2 plain free blocks
    assert not m.can_allocate("c", 24, m.lookup(h[:3]))  # + 3 new, but taking block 2 leaves 2 free
    m.allocate("c", 12)  # the two plain free blocks first, then the cached one is evicted
    assert m.num_evictions == 1 and m.lookup(h) == list(m.table("b")[:2])
    m.free("b")
    m.free("c")
    assert m.num_free == 6 and m.num_used == 0 and m.num_cached == 2
    m.reset_cache()
    assert m.lookup(h) == [] and m.num_free == 6


def prefix_cache(num_states: int = 4, interval: int = 2, blocks: int | None = 32) -> PrefixCache:
    return PrefixCache(BlockManager(blocks, BS), BS, num_states, needs_state=True, state_interval=interval)


def admitted(pc: PrefixCache, tokens: list[int], slot: int, params: SamplingParams = GREEDY,
             ) -> Sequence:
    seq = Sequence(str(slot), tokens, params)
    hit = pc.match(seq)
    seq.slot = slot
    pc.resume(seq, hit)
    return seq


def compute(pc: PrefixCache, seq: Sequence, n: int) -> None:
    pc.blocks.allocate(seq, seq.num_computed_tokens + n)
    seq.num_computed_tokens += n
    pc.computed(seq)


def test_chunks_end_at_interval_points_and_the_last_block_boundary():
    pc = prefix_cache(interval=2)
    # 23 tokens and one to generate: boundaries 8, 16 and the last at 20
    seq = Sequence("s", list(range(3, 26)), SamplingParams(max_tokens=1))
    assert pc.chunk_limit(seq, 0, 23) == 8
    assert pc.chunk_limit(seq, 8, 15) == 8
    assert pc.chunk_limit(seq, 16, 7) == 4
    assert pc.chunk_limit(seq, 20, 3) == 3
    assert pc.chunk_limit(seq, 17, 1) == 1  # a decode token is never cut
    # 12 to generate: the output crosses 24, whose state is saved, so no step is spent at 20
    longer = Sequence("s", list(range(3, 26)), GREEDY)
    assert pc.chunk_limit(longer, 16, 7) == 7
    off = PrefixCache(BlockManager(32, BS), BS, 4, needs_state=False, state_interval=2)
    assert off.chunk_limit(seq, 0, 23) == 23  # no DeltaNet: no states to save, no cuts


def test_a_hit_needs_a_saved_state_at_its_end_and_leaves_the_last_token_to_compute():
    pc = prefix_cache(interval=2)
    first = admitted(pc, list(range(3, 24)), slot=0)  # 21 tokens
    for n in (8, 8, 4, 1):
        compute(pc, first, n)
    saves, loads = pc.take_ops()
    # states at 8 and 16 (interval points) and 20 (the last boundary); 21 is not on a boundary
    assert sorted(e for _, e in saves) == sorted(set(e for _, e in saves)) and len(saves) == 3
    assert {s for s, _ in saves} == {0} and loads == ()
    again = admitted(pc, list(range(3, 24)), slot=1)  # the same 21 tokens: resumes at 20
    assert again.num_computed_tokens == 20 and again.num_cached_tokens == 20
    (_, slot), = pc.take_ops()[1]
    assert slot == 1
    longer = admitted(pc, [*range(3, 22), 99, 98, 97], slot=2)  # its 5th block differs
    assert longer.num_computed_tokens == 16
    aligned = admitted(pc, list(range(3, 11)), slot=3)  # 8 tokens: the state at 8 is at its last
    assert aligned.num_computed_tokens == 0  # token, which must be computed; none saved at 4
    assert pc.match(Sequence("p", list(range(3, 24)), SamplingParams(prompt_logprobs=0))) is None
    assert (pc.queried_tokens, pc.hit_tokens) == (21 + 21 + 22 + 8, 20 + 16)


def test_a_sequence_overwrites_its_own_last_boundary_state_and_the_pool_evicts_lru():
    pc = prefix_cache(num_states=3, interval=100)
    seq = admitted(pc, list(range(3, 8)), slot=0)  # 5 tokens, then decode
    compute(pc, seq, 4)  # the prompt's last boundary: an entry of its own
    compute(pc, seq, 1)
    for t in range(7):  # decode to 12 tokens: the state at 8, then at 12 in the same entry
        seq.append(50 + t, 0.0)
        compute(pc, seq, 1)
        if seq.num_computed_tokens == 8:
            at_8, _ = pc.take_ops()
    saves, _ = pc.take_ops()
    assert len(at_8) == 2 and saves == at_8[-1:] and pc.num_states_held == 2
    other = admitted(pc, list(range(60, 70)), slot=1)
    compute(pc, other, 8)  # the third entry; then a third sequence evicts the least recent one
    third = admitted(pc, list(range(80, 90)), slot=2)
    compute(pc, third, 8)
    assert pc.num_states_held == 3 and pc.state_evictions == 1
    assert admitted(pc, [*range(3, 8), 50, 51, 52, 9], slot=3).num_computed_tokens == 0  # 8: overwritten
    assert admitted(pc, [*range(3, 8), *range(50, 57), 9], slot=1).num_computed_tokens == 12
    pc.invalidate()
    assert pc.num_states_held == 0 and pc.take_ops() == ((), ())


def test_state_snapshots_save_then_load_within_one_step():
    state = DeltaNetState(3, conv_dim=4, conv_kernel=3, num_v_heads=2, k_head_dim=2, v_head_dim=2,
                          dtype=torch.float32)
    from model.cache import StateSnapshots

    pool = StateSnapshots(state, 2)
    state.conv[0], state.recurrent[0] = 1.0, 2.0
    pool.apply([(0, 1)], [(1, 2)])  # slot 0 saved to entry 1, which is loaded into slot 2 at once
    assert bool((state.conv[2] == 1).all()) and bool((state.recurrent[2] == 2).all())
    state.conv[0], state.recurrent[0] = 5.0, 6.0
    pool.apply([], [(1, 0)])  # and back into slot 0
    assert bool((state.conv[0] == 1).all()) and bool((state.recurrent[0] == 2).all())
    assert pool.nbytes == 2 * (4 * 2 + 2 * 2 * 2) * 4
    with pytest.raises(ValueError, match="name a snapshot entry twice"):
        StepInput((1,), (0,), (0,), (1,), (0,), state_saves=((0, 1), (2, 1)))


# -- the engine over the tiny models -----------------------------------------------------------
@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_next"), arch="qwen3_next")


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_moe"), arch="qwen3_moe")


def make_engine(model_dir, cache: bool, num_kv_blocks: int | None = None, states: int = 16,
                budget: int = 256, slots: int = 4, interval: int = 2) -> LLMEngine:
    ex = LocalExecutor(model_dir, dtype="float32", num_slots=slots, max_model_len=256, block_size=BS,
                       num_kv_blocks=num_kv_blocks, num_state_snapshots=states)
    return LLMEngine(ex, max_num_batched_tokens=budget, enable_prefix_caching=cache,
                     prefix_cache_state_interval=interval)


def tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(3, 380) for _ in range(n)]


def assert_same(got: list[Completion], want: list[Completion]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids, g.request_id
        torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=5e-4, atol=1e-4)


def chat(engine: LLMEngine, num_chats: int, turns: int, seed: int = 0, concurrent: bool = False,
         ) -> list[Completion]:
    """`num_chats` conversations of `turns` turns sharing a system prompt; each turn's prompt is the
    history (earlier prompts and outputs) plus a new message. Turns of different chats run
    together (`concurrent`) or one request at a time."""
    rng = random.Random(seed)
    system = tokens(rng, 21)
    histories = [list(system) for _ in range(num_chats)]
    out: list[Completion] = []
    for _ in range(turns):
        prompts = []
        for h in histories:
            h += tokens(rng, rng.randrange(3, 11))
            prompts.append(list(h))
        results = (engine.generate(prompts, GREEDY) if concurrent
                   else [engine.generate([p], GREEDY)[0] for p in prompts])
        for h, r in zip(histories, results, strict=True):
            h += r.token_ids
        out += results
    return out


def test_multi_turn_chats_and_a_shared_system_prompt_hit_with_unchanged_outputs(next_dir):
    on, off = make_engine(next_dir, cache=True), make_engine(next_dir, cache=False)
    assert_same(chat(on, 3, 3), chat(off, 3, 3))
    st = on.stats
    assert off.scheduler.prefix is None and off.stats.prefix_cache_queried_tokens == 0
    # Turns after the first resume at the last block boundary of the previous turn's prompt + output;
    # first turns of later chats at the system prompt's interval point (16 of its 21 tokens).
    assert st.prefix_cache_hit_tokens > 0.6 * st.prefix_cache_queried_tokens
    assert st.num_prompt_tokens + st.prefix_cache_hit_tokens == off.stats.num_prompt_tokens
    assert 0 < st.prefix_cache_states <= 16 and st.prefix_cache_state_entries == 16
    assert st.prefix_cache_state_bytes == 16 * state_bytes(on.config) > 0


def test_concurrent_requests_sharing_a_prefix(next_dir):
    on, off = make_engine(next_dir, cache=True), make_engine(next_dir, cache=False)
    # Two turns of 4 chats at once: the second turn's requests each resume from their own chat.
    assert_same(chat(on, 4, 2, seed=1, concurrent=True), chat(off, 4, 2, seed=1, concurrent=True))
    assert on.stats.prefix_cache_hit_tokens > 0
    # The same prompt 4 times at once, after it ran once: all four share its cached blocks.
    rng = random.Random(2)
    prompt = tokens(rng, 30)
    on.generate([prompt], GREEDY)
    before = on.stats.prefix_cache_hit_tokens
    assert_same(on.generate([prompt] * 4, GREEDY), off.generate([prompt] * 4, GREEDY))
    # Each resumes at 24, the last interval point inside the prompt (its output went past 28).
    assert on.stats.prefix_cache_hit_tokens - before == 4 * 24


def test_eviction_under_pressure_keeps_outputs_exact(next_dir):
    # 24 blocks of 4 tokens and 4 saved states for two chats that grow to ~80 tokens each: every
    # request saves two states (its prompt's end, its output's), so older ones go, and each turn
    # needs blocks other chats' cached ones are evicted for.
    on = make_engine(next_dir, cache=True, num_kv_blocks=24, states=4, interval=100)
    off = make_engine(next_dir, cache=False, num_kv_blocks=24)
    assert_same(chat(on, 2, 3, seed=3), chat(off, 2, 3, seed=3))
    st = on.stats
    assert st.prefix_cache_block_evictions > 0 and st.prefix_cache_state_evictions > 0
    assert st.prefix_cache_hit_tokens > 0 and st.prefix_cache_states == 4


def test_preemption_with_shared_blocks(next_dir):
    # Concurrent chats in a pool too small for all of them: sequences are preempted and resume
    # from the cache, their shared blocks counted, never freed under another sequence.
    on = make_engine(next_dir, cache=True, num_kv_blocks=24, budget=16)
    off = make_engine(next_dir, cache=False, num_kv_blocks=24, budget=16)
    assert_same(chat(on, 4, 2, seed=4, concurrent=True), chat(off, 4, 2, seed=4, concurrent=True))
    assert on.stats.num_preemptions > 0 and on.stats.prefix_cache_hit_tokens > 0
    assert on.stats.num_kv_blocks_used == 0


def run_one(engine: LLMEngine, prompt: list[int], params: SamplingParams) -> list:
    engine.add_request("one", prompt, params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    return outs


def test_prompt_logprobs_requests_compute_their_whole_prompt(next_dir):
    on, off = make_engine(next_dir, cache=True), make_engine(next_dir, cache=False)
    prompt = tokens(random.Random(5), 25)
    on.generate([prompt], GREEDY)
    scored = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=True, prompt_logprobs=0)
    hits = on.stats.prefix_cache_hit_tokens
    got, want = run_one(on, prompt, scored)[0], run_one(off, prompt, scored)[0]
    assert on.stats.prefix_cache_hit_tokens == hits  # no position's logits skipped
    assert len(got.prompt_logprobs) == 25 and got.prompt_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(got.prompt_logprobs[1:]), torch.tensor(want.prompt_logprobs[1:]),
                               rtol=5e-4, atol=1e-4)


def test_attention_only_model_hits_without_states(moe_dir):
    on, off = make_engine(moe_dir, cache=True), make_engine(moe_dir, cache=False)
    assert on.executor.num_state_snapshots == 0
    assert_same(chat(on, 2, 3, seed=6), chat(off, 2, 3, seed=6))
    st = on.stats
    assert st.prefix_cache_hit_tokens > 0.6 * st.prefix_cache_queried_tokens and st.prefix_cache_states == 0


class LosingExecutor(LocalExecutor):
    """Loses its state once, as a restarted actor would: every cache and saved state scrambled,
    the step refused with ExecutorStateLostError(recovered=True)."""

    lose_at: int | None = None

    def execute(self, step: StepInput) -> torch.Tensor:
        self.lose_at = None if self.lose_at is None else self.lose_at - 1
        if self.lose_at == 0:
            with torch.no_grad():
                for t in [*(c.__dict__.values() for c in self.caches),
                          *(s.__dict__.values() for s in self.snapshots)]:
                    for v in t:
                        if isinstance(v, torch.Tensor) and v.is_floating_point():
                            v.normal_()
            raise ExecutorStateLostError("an actor died", recovered=True)
        return super().execute(step)


def test_lost_executor_state_means_recompute_not_stale_snapshots(next_dir):
    ex = LosingExecutor(next_dir, dtype="float32", num_slots=4, max_model_len=256, block_size=BS)
    on = LLMEngine(ex, enable_prefix_caching=True, prefix_cache_state_interval=2)
    off = make_engine(next_dir, cache=False)
    rng = random.Random(7)
    prompts = [tokens(rng, 20) for _ in range(3)]
    assert_same(on.generate(prompts, GREEDY), off.generate(prompts, GREEDY))
    follow = [p + tokens(rng, 6) for p in prompts]
    ex.lose_at = 1  # the next step, the one that would resume from the cache
    assert_same(on.generate(follow, GREEDY), off.generate(follow, GREEDY))
    # New requests sharing the first prompts resume only from what was saved since the loss.
    hits = on.stats.prefix_cache_hit_tokens
    other = [p + tokens(rng, 5) for p in prompts]
    assert_same(on.generate(other, GREEDY), off.generate(other, GREEDY))
    assert on.stats.prefix_cache_hit_tokens > hits


def test_prefix_caching_off_and_without_executor_support(next_dir):
    from tests.engine.fakes import FakeExecutor

    assert LLMEngine(FakeExecutor()).scheduler.prefix is None  # its slots cannot start past 0
    engine = make_engine(next_dir, cache=False)
    assert engine.scheduler.prefix is None and engine.stats.prefix_cache_state_entries == 0
