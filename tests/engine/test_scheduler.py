import pytest

from engine.sampling import SamplingParams
from engine.scheduler import PromptTooLongError, Scheduler, SchedulerConfig, SlotAllocator
from engine.sequence import Sequence, SequenceStatus


def seq(rid: str, n: int) -> Sequence:
    return Sequence(rid, list(range(2, 2 + n)), SamplingParams(temperature=0))


def run_chunks(out) -> list[tuple[str, int, int]]:
    """(request, start, tokens) per chunk; marks the chunk's tokens computed as the engine would."""
    rows = [(c.seq.request_id, c.start, c.num_tokens) for c in out.chunks]
    for c in out.chunks:
        c.seq.num_computed_tokens += c.num_tokens
        if c.samples:
            c.seq.append(7, -1.0)
    return rows


def test_chunked_prefill_splits_a_long_prompt_within_the_budget():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=8, max_model_len=64), num_slots=2)
    a = seq("a", 20)
    s.add(a)
    assert run_chunks(s.schedule()) == [("a", 0, 8)]
    assert run_chunks(s.schedule()) == [("a", 8, 8)]
    out = s.schedule()
    assert [c.samples for c in out.chunks] == [True]
    assert run_chunks(out) == [("a", 16, 4)]
    assert run_chunks(s.schedule()) == [("a", 20, 1)]  # decode


def test_decode_goes_first_and_prefill_chunks_share_the_step():
    s = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=8, max_model_len=64), num_slots=3)
    a, b, c = seq("a", 3), seq("b", 12), seq("c", 5)
    s.add(a)
    assert run_chunks(s.schedule()) == [("a", 0, 3)]
    s.add(b)
    s.add(c)
    # a decodes; b takes the rest of the budget; c waits for budget although a slot is free.
    out = s.schedule()
    assert [c.samples for c in out.chunks] == [True, False]
    assert run_chunks(out) == [("a", 3, 1), ("b", 0, 7)]
    assert c.status is SequenceStatus.WAITING
    assert run_chunks(s.schedule()) == [("a", 4, 1), ("b", 7, 5), ("c", 0, 2)]
    assert run_chunks(s.schedule()) == [("a", 5, 1), ("b", 12, 1), ("c", 2, 3)]
    # Three decodes of different lengths in one step.
    assert run_chunks(s.schedule()) == [("a", 6, 1), ("b", 13, 1), ("c", 5, 1)]


def test_max_num_seqs_and_slots_limit_admission():
    s = Scheduler(SchedulerConfig(max_num_seqs=2, max_num_batched_tokens=100, max_model_len=64), num_slots=4)
    seqs = [seq(str(i), 3) for i in range(4)]
    for q in seqs:
        s.add(q)
    assert [r[0] for r in run_chunks(s.schedule())] == ["0", "1"]
    assert len(s.waiting) == 2 and s.slots.num_used == 2
    s.finish(seqs[0], "stop")
    assert [r[0] for r in run_chunks(s.schedule())] == ["1", "2"]
    s2 = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=100), num_slots=1)
    for q in [seq("x", 2), seq("y", 2)]:
        s2.add(q)
    assert [r[0] for r in run_chunks(s2.schedule())] == ["x"]


def test_finish_frees_slots():
    s = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=100), num_slots=3)
    a, b, c = seq("a", 2), seq("b", 2), seq("c", 2)
    for q in (a, b, c):
        s.add(q)
    run_chunks(s.schedule())
    assert s.slots.num_free == 0
    s.finish(a, "length")
    assert a.slot is None and a.finish_reason == "length" and s.slots.num_free == 1
    s.finish(b, "abort")
    assert b.finish_reason == "abort" and b.is_finished
    s.finish(c, "stop")
    assert s.slots.num_free == 3 and not s.has_unfinished()
    w = seq("w", 2)
    s.add(w)
    s.finish(w, "abort")
    assert not s.waiting and s.slots.num_free == 3  # a waiting request holds no slot


def test_prompt_longer_than_max_model_len_is_refused():
    s = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=8, max_model_len=16), num_slots=1)
    with pytest.raises(PromptTooLongError, match=r"prompt of request 'a' has 17 tokens, more than "
                                                 r"max_model_len=16"):
        s.add(seq("a", 17))
    s.add(seq("b", 16))  # fits: its first output token needs no cache space


def test_slot_allocator():
    slots = SlotAllocator(2)
    a, b = slots.allocate(), slots.allocate()
    assert {a, b} == {0, 1} and slots.num_free == 0
    with pytest.raises(RuntimeError, match="no free cache slot"):
        slots.allocate()
    slots.free(a)
    with pytest.raises(ValueError, match="slot 0 is not allocated"):
        slots.free(a)
    assert slots.allocate() == a and slots.num_used == 2


@pytest.mark.parametrize("kwargs, message", [
    (dict(max_num_seqs=0), "max_num_seqs must be an integer >= 1, got 0"),
    (dict(max_model_len=-5), "max_model_len must be an integer >= 1, got -5"),
    (dict(max_num_seqs=16, max_num_batched_tokens=8),
     r"max_num_batched_tokens \(8\) must be >= max_num_seqs"),
])
def test_scheduler_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SchedulerConfig(**kwargs)


def test_isolated_sequences_recompute_alone_up_to_the_failed_step_then_rejoin():
    s = Scheduler(SchedulerConfig(max_num_seqs=3, max_num_batched_tokens=4, max_model_len=64,
                                  num_kv_blocks=16, block_size=4), num_slots=3)
    a, b, c = seq("a", 2), seq("b", 9), seq("c", 3)
    for q in (a, b):
        s.add(q)
    assert run_chunks(s.schedule()) == [("a", 0, 2), ("b", 0, 2)]
    s.add(c)
    failed = s.schedule()  # the executor fails this step: nothing of it is computed
    assert [(ch.seq.request_id, ch.start, ch.num_tokens) for ch in failed.chunks] == [("a", 2, 1),
                                                                                       ("b", 2, 3)]
    blocks = s.blocks.num_used
    s.isolate(failed.chunks)
    assert s.is_isolated(a) and s.is_isolated(b) and a.num_computed_tokens == b.num_computed_tokens == 0
    # Each alone, from its first token to where the failed step would have taken it; c waits.
    assert run_chunks(s.schedule()) == [("a", 0, 3)]  # samples, as a's failed chunk would have
    assert run_chunks(s.schedule()) == [("b", 0, 4)]
    assert run_chunks(s.schedule()) == [("b", 4, 1)]
    assert s.blocks.num_used == blocks  # the slots and blocks it held already cover the recompute
    assert run_chunks(s.schedule()) == [("a", 3, 1), ("b", 5, 3)]  # back in the batch
    assert not s.isolated and c.status is SequenceStatus.WAITING
    s.isolate(s.schedule().chunks)
    s.finish(a, "abort")  # an isolated sequence that ends leaves isolation
    assert [ch.seq for ch in s.schedule().chunks] == [b] and a not in s.isolated
