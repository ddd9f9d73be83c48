"""LLMEngine over the fake executor: continuous batching, chunked prefill, stop conditions, slot
bookkeeping. Every generated sequence is checked against a one-sequence-at-a-time reference."""

import pytest

from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from engine.scheduler import PromptTooLongError
from tests.engine.fakes import EOS, FakeExecutor, fake_logits, reference_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True)


def prompt(n: int, seed: int = 0) -> list[int]:
    return [2 + (seed * 7 + 3 * i) % 29 for i in range(n)]


def run(engine: LLMEngine) -> dict[str, list]:
    """Step to the end; per request, the outputs it received."""
    got: dict[str, list] = {}
    while engine.has_unfinished():
        for o in engine.step():
            got.setdefault(o.request_id, []).append(o)
    return got


def tokens(outputs) -> list[int]:
    return [t for o in outputs for t in o.new_token_ids]


def test_generate_batch_matches_one_at_a_time():
    ex = FakeExecutor(num_slots=4)
    engine = LLMEngine(ex)
    prompts = [prompt(3, 1), prompt(11, 2), prompt(1, 3), prompt(6, 4)]
    results = engine.generate(prompts, GREEDY)
    for p, r in zip(prompts, results, strict=True):
        assert list(r.token_ids) == reference_greedy(p, 6, eos=None)
        assert r.finish_reason == "length" and len(r.logprobs) == 6
    # Sequences of different lengths decoded together in one step.
    assert any(len(s.slots) == 4 and set(s.lengths) == {1} and len(set(s.starts)) == 4 for s in ex.steps)


def test_requests_join_and_leave_the_running_batch():
    ex = FakeExecutor(num_slots=2)
    engine = LLMEngine(ex)
    engine.add_request("a", prompt(4, 1), SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    engine.step()
    engine.step()
    engine.add_request("b", prompt(5, 2), SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    out = {o.request_id: o for o in engine.step()}  # a decodes, b prefills; both sample
    assert set(out) == {"a", "b"} and ex.steps[-1].lengths == (1, 5)
    assert out["a"].finished  # a leaves after its 3rd token
    engine.add_request("c", prompt(2, 3), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    num_steps = len(ex.steps)
    got = run(engine)
    assert [*out["b"].new_token_ids, *tokens(got["b"])] == reference_greedy(prompt(5, 2), 6, eos=None)
    assert tokens(got["c"]) == reference_greedy(prompt(2, 3), 2, eos=None)
    assert ex.steps[num_steps].slots == (1, 0)  # b decodes; c prefills in the slot a gave back
    assert engine.stats.num_slots_used == 0 and engine.stats.num_finished == 3


def test_chunked_prefill_equals_unchunked():
    prompts = [prompt(23, 1), prompt(5, 2), prompt(17, 3)]
    whole = LLMEngine(FakeExecutor(num_slots=3), max_num_batched_tokens=64).generate(prompts, GREEDY)
    ex = FakeExecutor(num_slots=3)
    chunked = LLMEngine(ex, max_num_batched_tokens=4).generate(prompts, GREEDY)
    assert [r.token_ids for r in chunked] == [r.token_ids for r in whole]
    assert [r.logprobs for r in chunked] == [r.logprobs for r in whole]
    assert max(sum(s.lengths) for s in ex.steps) <= 4
    assert any(1 in s.lengths and max(s.lengths) > 1 for s in ex.steps)  # decode mixed with prefill


def test_max_num_seqs_is_respected():
    ex = FakeExecutor(num_slots=4)
    engine = LLMEngine(ex, max_num_seqs=2)
    prompts = [prompt(3 + i, i) for i in range(5)]
    results = engine.generate(prompts, GREEDY)
    assert max(len(s.slots) for s in ex.steps) == 2
    assert max(max(s.slots) for s in ex.steps) <= 3
    for p, r in zip(prompts, results, strict=True):
        assert list(r.token_ids) == reference_greedy(p, 6, eos=None)


def test_stop_conditions():
    p = prompt(4, 5)
    free = reference_greedy(p, 8, eos=None)
    ex = FakeExecutor(num_slots=1, max_model_len=8)
    engine = LLMEngine(ex)
    # A stop token: the output ends with it, reason "stop".
    r = engine.generate([p], SamplingParams(temperature=0, max_tokens=8, stop_token_ids=[free[2]],
                                            ignore_eos=True))[0]
    assert list(r.token_ids) == free[:free.index(free[2]) + 1] and r.finish_reason == "stop"
    # max_model_len: prompt + output stop at 8 tokens.
    r = engine.generate([p], SamplingParams(temperature=0, max_tokens=100, ignore_eos=True))[0]
    assert list(r.token_ids) == free[:4] and r.finish_reason == "length"
    # EOS stops unless ignored.
    r = LLMEngine(FakeExecutor(num_slots=1), eos_token_ids=[free[1]]).generate(
        [p], SamplingParams(temperature=0, max_tokens=8))[0]
    assert list(r.token_ids) == free[:free.index(free[1]) + 1] and r.finish_reason == "stop"
    assert LLMEngine(FakeExecutor()).eos_token_ids == {EOS}


def test_abort_frees_the_slot_and_drops_the_request():
    ex = FakeExecutor(num_slots=2)
    engine = LLMEngine(ex)
    engine.add_request("a", prompt(3), GREEDY)
    engine.add_request("b", prompt(3), GREEDY)
    engine.add_request("w", prompt(3), GREEDY)  # waits: two slots
    engine.step()
    assert engine.stats.num_slots_used == 2 and engine.stats.num_waiting == 1
    assert engine.abort_request("a") and not engine.abort_request("a") and not engine.abort_request("zz")
    assert engine.stats.num_slots_used == 1
    assert engine.abort_request("w")
    got = run(engine)
    assert set(got) == {"b"} and got["b"][-1].finished
    assert engine.stats.num_slots_used == 0 and not engine.has_unfinished()
    engine.add_request("a", prompt(3), GREEDY)  # an id is free again once its request ended


def test_seeded_request_is_independent_of_its_batch():
    params = SamplingParams(temperature=1.0, seed=42, max_tokens=8, ignore_eos=True)
    alone = LLMEngine(FakeExecutor(num_slots=3)).generate([prompt(5)], params)[0].token_ids
    others = [SamplingParams(temperature=0.8, max_tokens=5), SamplingParams(temperature=0.3, seed=1)]
    batch = LLMEngine(FakeExecutor(num_slots=3)).generate(
        [prompt(9, 1), prompt(5), prompt(2, 2)], [others[0], params, others[1]])
    assert batch[1].token_ids == alone
    assert alone != tuple(reference_greedy(prompt(5), 8, eos=None))


def test_outputs_and_stats():
    engine = LLMEngine(FakeExecutor(num_slots=2), max_num_batched_tokens=4)
    engine.add_request("a", prompt(6), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    assert engine.step() == []  # the first chunk of the prompt samples nothing
    (o,) = engine.step()
    assert o.new_token_ids == tuple(reference_greedy(prompt(6), 1, eos=None)) and o.new_logprobs is None
    assert not o.finished and o.num_prompt_tokens == 6 and o.num_output_tokens == 1
    (o,) = engine.step()
    assert o.finished and o.finish_reason == "length" and o.num_output_tokens == 2
    st = engine.stats
    assert (st.num_steps, st.num_prompt_tokens, st.num_generated_tokens, st.num_finished) == (3, 6, 2, 1)
    assert (st.num_running, st.num_waiting, st.num_slots_used, st.num_slots) == (0, 0, 0, 2)
    assert engine.step() == []


@pytest.mark.parametrize("ids, message", [
    ([], "the prompt is empty"),
    ([3, 32], "token id 32 is out of range for vocab_size 32"),
    ([-1], "token id -1 is out of range"),
])
def test_bad_prompts_are_refused(ids, message):
    engine = LLMEngine(FakeExecutor())
    with pytest.raises(ValueError, match=message):
        engine.add_request("a", ids)
    assert not engine.has_unfinished()


def test_limits_are_checked():
    engine = LLMEngine(FakeExecutor(max_model_len=8))
    with pytest.raises(PromptTooLongError, match="has 9 tokens, more than max_model_len=8"):
        engine.add_request("a", prompt(9))
    engine.add_request("a", prompt(3))
    with pytest.raises(ValueError, match="request id 'a' is already in use"):
        engine.add_request("a", prompt(3))
    with pytest.raises(ValueError, match="exceeds the executor's 4 slots"):
        LLMEngine(FakeExecutor(num_slots=4), max_num_seqs=5)
    with pytest.raises(ValueError, match="exceeds the executor's slot length 8"):
        LLMEngine(FakeExecutor(max_model_len=8), max_model_len=9)
    with pytest.raises(RuntimeError, match="idle engine"):
        engine.generate([prompt(2)])


@pytest.mark.parametrize("budget", [3, 64])
def test_prompt_logprobs_across_prefill_chunks(budget):
    """Every prompt token is scored by the logits of the position before it, however the prompt
    is split over steps; the first token has none."""
    import torch

    from tests.engine.fakes import fake_logits

    ex = FakeExecutor(num_slots=2)
    engine = LLMEngine(ex, max_num_batched_tokens=max(budget, 2))
    p = prompt(9, 5)
    engine.add_request("a", p, SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, prompt_logprobs=2,
                                              logprobs=True, top_logprobs=3))
    engine.add_request("b", prompt(4, 1), SamplingParams(temperature=0, max_tokens=2, ignore_eos=True))
    got = run(engine)
    first = got["a"][0]
    assert first.prompt_logprobs[0] is None and len(first.prompt_logprobs) == len(p)
    for j in range(1, len(p)):
        logp = torch.log_softmax(fake_logits(p[:j], 32), -1)
        assert first.prompt_logprobs[j] == pytest.approx(float(logp[p[j]]), abs=1e-5)
        top = first.prompt_top_logprobs[j]
        assert [t for t, _ in top] == logp.topk(2).indices.tolist()
    assert all(o.prompt_logprobs is None for o in got["a"][1:] + got["b"])
    assert tokens(got["a"]) == reference_greedy(p, 2, eos=None)  # scoring changes nothing sampled
    assert all(len(o.new_top_logprobs[0]) == 3 for o in got["a"]) and got["b"][0].new_top_logprobs is None


def reference_penalized(prompt_ids: list[int], p: SamplingParams, eos: int = EOS) -> list[int]:
    """Greedy decoding with the penalties, logit_bias and min_tokens written as a plain loop over
    one sequence's tokens (no batching, no count tensors)."""
    out: list[int] = []
    while len(out) < p.max_tokens:
        x = fake_logits(prompt_ids + out, 32)
        for t, b in p.logit_bias:
            x[t] += b
        if len(out) < p.min_tokens:
            for t in {*p.stop_token_ids, *(() if p.ignore_eos else (eos,))}:
                x[t] = float("-inf")
        for t in set(prompt_ids + out):
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        for t in set(out):
            x[t] -= p.frequency_penalty * out.count(t) + p.presence_penalty
        out.append(int(x.argmax()))
        stops = out[-1] in p.stop_token_ids or (not p.ignore_eos and out[-1] == eos)
        if stops and len(out) >= p.min_tokens:  # as vLLM's check_stop
            break
    return out


def test_penalties_bias_and_min_tokens_in_a_batch_match_a_plain_loop():
    g = dict(temperature=0, max_tokens=12)
    params = [SamplingParams(**g, repetition_penalty=1.8), SamplingParams(**g, presence_penalty=2),
              SamplingParams(**g, frequency_penalty=1.5, repetition_penalty=0.7),
              SamplingParams(**g, logit_bias={5: 4.0, 9: -100, EOS: 40}, min_tokens=6),
              SamplingParams(**g, min_tokens=10, logit_bias={EOS: 40, 3: 30}, stop_token_ids=[3]),
              SamplingParams(**g)]
    prompts = [prompt(4 + i, i) for i in range(len(params))]
    engine = LLMEngine(FakeExecutor(num_slots=3, max_model_len=64))  # 3 slots: requests join later
    results = engine.generate(prompts, params)
    for p, sp, r in zip(prompts, params, results, strict=True):
        assert list(r.token_ids) == reference_penalized(p, sp), sp
    plain = reference_greedy(prompts[0], 12)
    assert list(results[0].token_ids) != plain  # the penalty changed something
    # the biased EOS (and stop id) would end #3 and #4 at once: min_tokens holds them off
    assert results[3].token_ids[6] == EOS and len(results[3].token_ids) == 7
    assert EOS not in results[4].token_ids[:10] and 3 not in results[4].token_ids[:10]
    assert len(results[4].token_ids) == 11 and results[4].finish_reason == "stop"


def test_logit_bias_must_name_tokens_of_the_model():
    engine = LLMEngine(FakeExecutor())
    with pytest.raises(ValueError, match="logit_bias names token id 32, out of range for vocab_size 32"):
        engine.add_request("a", prompt(3), SamplingParams(logit_bias={32: 1.0}))
    assert not engine.has_unfinished()
