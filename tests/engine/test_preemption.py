"""Preemption when KV-cache blocks run out (vLLM's recompute policy): the newest running sequence
gives back its slot and blocks and goes first in the waiting queue; recomputed, it produces the
tokens an unconstrained engine produces. Over a fake executor that keeps tokens in a paged pool
(so any block mix-up changes the tokens) and over the real local executor."""

from __future__ import annotations

import pytest

from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.scheduler import PromptTooLongError, Scheduler, SchedulerConfig
from engine.sequence import SequenceStatus
from tests.engine.fakes import FakeExecutor, PagedFakeExecutor, reference_greedy
from tests.engine.test_scheduler import run_chunks, seq

PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15], [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=True, prompt_logprobs=2)


def run(engine: LLMEngine, prompts, params) -> dict[str, list]:
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    got: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).append(o)
    return got


def test_preempted_sequences_recompute_to_the_unconstrained_tokens():
    # 4 slots; the prompts end with 18 blocks of 4 tokens between them, the pool has 8.
    small = LLMEngine(PagedFakeExecutor(num_kv_blocks=8, num_slots=4), max_num_batched_tokens=8)
    got = run(small, PROMPTS, GREEDY)
    assert small.scheduler.num_preemptions > 0
    assert small.stats.num_preemptions == small.scheduler.num_preemptions
    assert small.executor.max_blocks_used == 8
    full = run(LLMEngine(PagedFakeExecutor(num_kv_blocks=64, num_slots=4), max_num_batched_tokens=8),
               PROMPTS, GREEDY)
    for i, p in enumerate(PROMPTS):
        tokens = [t for o in got[str(i)] for t in o.new_token_ids]
        assert tokens == reference_greedy(p, 10, eos=None)
        assert [o.new_logprobs for o in got[str(i)]] == [o.new_logprobs for o in full[str(i)]]
        # Prompt logprobs come once, each prompt position scored once, recompute or not.
        first = got[str(i)][0]
        assert first.prompt_logprobs == full[str(i)][0].prompt_logprobs
        assert len(first.prompt_logprobs) == len(p)
        assert all(o.prompt_logprobs is None for o in got[str(i)][1:])
    st = small.stats
    assert (st.num_kv_blocks, st.num_kv_blocks_used, st.num_slots_used) == (8, 0, 0)


def test_stats_count_blocks_in_use():
    engine = LLMEngine(PagedFakeExecutor(num_kv_blocks=8, num_slots=2))
    engine.add_request("a", list(range(2, 11)), SamplingParams(temperature=0, max_tokens=4))
    engine.step()  # 9 prompt tokens: 3 blocks of 4
    assert (engine.stats.num_kv_blocks_used, engine.stats.num_kv_blocks) == (3, 8)


def test_prompt_longer_than_the_pool_is_refused_and_a_full_pool_ends_with_length():
    engine = LLMEngine(PagedFakeExecutor(num_kv_blocks=2, num_slots=2))
    with pytest.raises(PromptTooLongError, match=r"has 9 tokens, which need 3 KV-cache blocks of 4 tokens; "
                                                 r"the whole cache has 2 blocks \(8 tokens"):
        engine.add_request("long", list(range(2, 11)), GREEDY)
    # 8 tokens fit exactly: one token is sampled from them, then the sequence has filled the pool.
    [c] = engine.generate([list(range(2, 10))], GREEDY)
    assert c.finish_reason == "length" and len(c.token_ids) == 1
    assert engine.scheduler.max_seq_len == 8


def test_unconstrained_executor_sends_no_tables_when_it_keeps_no_paged_cache():
    ex = FakeExecutor(num_slots=2)  # num_kv_blocks None
    engine = LLMEngine(ex)
    engine.generate([[3, 4, 5]], SamplingParams(temperature=0, max_tokens=2))
    assert all(s.block_tables is None for s in ex.steps) and engine.stats.num_kv_blocks == 0


# -- the scheduler alone ---------------------------------------------------------------------------
def scheduler(num_kv_blocks: int, budget: int = 64, slots: int = 3) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=slots, max_num_batched_tokens=budget, max_model_len=64,
                                     block_size=4, num_kv_blocks=num_kv_blocks), num_slots=slots)


def test_decode_preempts_the_newest_which_waits_first_and_is_recomputed():
    s = scheduler(num_kv_blocks=4)
    a, b, c = seq("a", 4), seq("b", 4), seq("c", 4)
    for q in (a, b, c):
        s.add(q)
    assert run_chunks(s.schedule()) == [("a", 0, 4), ("b", 0, 4), ("c", 0, 4)]
    assert s.blocks.num_free == 1
    # a takes the last block for its 5th token; b finds none and preempts c, the newest.
    assert run_chunks(s.schedule()) == [("a", 4, 1), ("b", 4, 1)]
    assert s.num_preemptions == 1 and list(s.waiting) == [c] and list(s.running) == [a, b]
    assert c.status is SequenceStatus.WAITING and c.num_computed_tokens == 0 and c.slot is None
    assert s.blocks.table(c) == () and s.slots.num_free == 1 and c.output_token_ids == [7]
    # c's recompute (prompt + its output: 5 tokens, 2 blocks) waits for blocks.
    assert run_chunks(s.schedule()) == [("a", 5, 1), ("b", 5, 1)]
    s.finish(a, "stop")
    out = s.schedule()
    assert out.chunks[1].samples  # the recompute samples c's next token
    assert run_chunks(out) == [("b", 6, 1), ("c", 0, 5)]
    assert s.num_preemptions == 1


def test_the_newest_preempts_itself():
    s = scheduler(num_kv_blocks=3)
    a, b = seq("a", 3), seq("b", 8)
    s.add(a)
    s.add(b)
    assert run_chunks(s.schedule()) == [("a", 0, 3), ("b", 0, 8)]
    # a's 4th token fits its block; b, the newest, needs a third block and there is none.
    assert run_chunks(s.schedule()) == [("a", 3, 1)]
    assert list(s.waiting) == [b] and s.num_preemptions == 1 and s.blocks.table(a) == (0,)


def test_a_prefill_preempting_a_scheduled_decode_takes_back_its_chunk():
    s = scheduler(num_kv_blocks=3, budget=16)
    a, b = seq("a", 8), seq("b", 2)
    s.add(a)
    s.add(b)
    run_chunks(s.schedule())
    a.num_computed_tokens = 0  # a must prefill again (as after lost executor state) with b decoding
    out = s.schedule()  # b's decode is scheduled first, then a's 9 tokens need b's block
    assert [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks] == [("a", 0, 9)]
    assert list(s.waiting) == [b] and out.num_tokens == 9


def test_no_admission_in_a_step_that_preempted():
    s = scheduler(num_kv_blocks=3, slots=3)
    a, b = seq("a", 4), seq("b", 4)
    s.add(a)
    s.add(b)
    run_chunks(s.schedule())
    s.add(seq("c", 1))
    # a takes the free block; b's 5th token preempts b itself; c would fit nothing this step.
    assert run_chunks(s.schedule()) == [("a", 4, 1)]
    assert [q.request_id for q in s.waiting] == ["b", "c"]


def test_prompt_too_long_for_the_pool():
    s = scheduler(num_kv_blocks=2)
    with pytest.raises(PromptTooLongError, match="the whole cache has 2 blocks"):
        s.add(seq("x", 9))
    s.add(seq("y", 8))
    assert Scheduler(SchedulerConfig(num_kv_blocks=None), num_slots=1).max_seq_len == 4096
    with pytest.raises(ValueError, match="num_kv_blocks"):
        SchedulerConfig(num_kv_blocks=0)
