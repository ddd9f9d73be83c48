"""MTP speculative decoding (engine/spec_decode.py, the engine's verify steps, the local executor's
drafter and DeltaNet rollback): rejection sampling keeps the target distribution (statistically,
on a small vocabulary), and greedy tokens through the engine equal those without speculation for
k = 1..3, on random-weight checkpoints (drafts mostly rejected: the rollback path) and on the
trained built-in model (drafts mostly accepted), with chunked prefill, prefix caching and
preemption."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from engine.llm_engine import Completion, LLMEngine
from engine.local_executor import LocalExecutor
from engine.sampling import History, Sampler, SamplingParams
from engine.spec_decode import rejection_sample, verify
from model.batch import BatchLayout
from model.cache import DeltaNetState

ROOT = Path(__file__).resolve().parents[2]
TRAINED = ROOT / "models" / "tiny-qwen3-next"
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=True)


# -- verification ------------------------------------------------------------------------------
def test_rejection_sampling_keeps_the_target_distribution():
    """Drafts drawn from q, verified against p: every emitted position is distributed as p (a
    chi-square test at a fixed seed, V = 6, 3 drafts), for a general q and for a one-hot q (the
    MTP's greedy drafts)."""
    g = torch.Generator().manual_seed(0)
    V, m, n = 6, 3, 6000
    p = torch.softmax(torch.randn(m + 1, V, generator=g) * 1.5, -1)
    q = torch.softmax(torch.randn(m, V, generator=g) * 1.5, -1)
    for one_hot in (False, True):
        counts = torch.zeros(V)
        for _ in range(n):
            drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(m)]
            qq = torch.nn.functional.one_hot(torch.tensor(drafts), V).float() if one_hot else q
            out = rejection_sample(p, qq, drafts, g)
            assert 1 <= len(out) <= m + 1 and out[:-1] == drafts[:len(out) - 1]
            counts[out[0]] += 1
        expected = p[0] * n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < 20.5, (one_hot, chi2, counts / n, p[0])  # p = 0.001 at 5 degrees of freedom


def test_rejection_sampling_later_positions_follow_p_given_the_earlier_ones():
    """The token at position 1 given the token at position 0: with the drafts fixed to the one the
    first position emits most, the second emitted token (when the first draft was accepted) is
    distributed as p[1]."""
    g = torch.Generator().manual_seed(1)
    V, n = 5, 8000
    p = torch.softmax(torch.randn(3, V, generator=g), -1)
    q = torch.softmax(torch.randn(2, V, generator=g), -1)
    counts = torch.zeros(V)
    for _ in range(n):
        drafts = [int(torch.multinomial(q[j], 1, generator=g)) for j in range(2)]
        out = rejection_sample(p, q, drafts, g)
        if len(out) >= 2:
            counts[out[1]] += 1
    total = float(counts.sum())
    expected = p[1] * total
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.5, (chi2, counts / total, p[1])  # p = 0.001 at 4 degrees of freedom


def test_greedy_verification_accepts_the_matching_prefix_and_adds_the_targets_token():
    raw = torch.full((4, 8), -5.0)
    for row, tok in enumerate([3, 5, 1, 7]):
        raw[row, tok] = 5.0
    params = [SamplingParams(temperature=0)]
    out = verify(Sampler(), raw, params, [History()], [[3, 5, 2]], [None])
    assert out[0][0] == [3, 5, 1]  # d1, d2 accepted, d3 rejected: the target's 1 follows
    out = verify(Sampler(), raw, params, [History()], [[3, 5, 1]], [None])
    assert out[0][0] == [3, 5, 1, 7]  # all accepted, the bonus token
    assert out[0][1] == pytest.approx(torch.log_softmax(raw, -1)[[0, 1, 2, 3], [3, 5, 1, 7]].tolist())


def test_penalties_see_the_drafts_before_each_row():
    """Row j is penalized as if drafts 1..j were already output: a draft repeated under a frequency
    penalty loses to the runner-up exactly where a one-token step would."""
    raw = torch.tensor([[0.0, 2.0, 1.5], [0.0, 2.0, 1.5], [0.0, 2.0, 1.5]])
    params = [SamplingParams(temperature=0, frequency_penalty=1.0)]
    out = verify(Sampler(), raw, params, [History((0,), ())], [[1, 1]], [None])
    assert out[0][0] == [1, 2]  # row 1 sees one 1: 2.0 - 1 < 1.5


# -- DeltaNet rollback ------------------------------------------------------------------------
def test_kept_states_equal_one_token_steps(next_dir):
    """A verify chunk with keep_states leaves, after each token, the state that token-by-token
    steps reach; rolling back to token j gives that state."""
    from model.decoder import CausalLM

    lm = CausalLM.from_pretrained(next_dir, dtype="float32")
    prompt = list(range(5, 14))
    chunk = [20, 21, 22, 23]
    caches_a = lm.make_caches(2, 64)
    caches_b = lm.make_caches(2, 64)
    with torch.inference_mode():
        for caches in (caches_a, caches_b):
            lm(torch.tensor(prompt), BatchLayout.build([0], [0], [len(prompt)]), caches)
        lm(torch.tensor(chunk), BatchLayout.build([0], [len(prompt)], [4], keep_states=4), caches_a)
        steps = []
        for i, t in enumerate(chunk):
            lm(torch.tensor([t]), BatchLayout.build([0], [len(prompt) + i], [1]), caches_b)
            steps.append([(c.conv[0].clone(), c.recurrent[0].clone()) for c in caches_b
                          if isinstance(c, DeltaNetState)])
    states_a = [c for c in caches_a if isinstance(c, DeltaNetState)]
    kept = [dict(c.kept) for c in states_a]
    for j in (4, 2, 1):
        for c, saved, (conv, rec) in zip(states_a, kept, steps[j - 1], strict=True):
            c.kept = dict(saved)
            c.rollback([(0, j)])
            assert not c.kept
            torch.testing.assert_close(c.conv[0], conv)
            torch.testing.assert_close(c.recurrent[0], rec)


# -- the engine --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_next"), arch="qwen3_next")


def make_engine(model_dir, k: int, num_kv_blocks: int | None = None, budget: int = 256, slots: int = 4,
                cache: bool = True) -> LLMEngine:
    ex = LocalExecutor(model_dir, dtype="float32", num_slots=slots, max_model_len=256, block_size=4,
                       num_kv_blocks=num_kv_blocks, num_state_snapshots=8, speculative_tokens=k)
    return LLMEngine(ex, max_num_batched_tokens=budget, enable_prefix_caching=cache,
                     prefix_cache_state_interval=2)


def prompts(seed: int, n: int, lo: int = 5, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 380) for _ in range(rng.randrange(lo, hi))] for _ in range(n)]


def assert_same(got: list[Completion], want: list[Completion]) -> None:
    for g, w in zip(got, want, strict=True):
        assert g.token_ids == w.token_ids, g.request_id
        assert g.finish_reason == w.finish_reason
        if w.logprobs is not None:
            torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=5e-4,
                                       atol=1e-4)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_greedy_tokens_equal_no_speculation_on_a_random_checkpoint(next_dir, k):
    ps = prompts(k, 5)
    want = make_engine(next_dir, 0).generate(ps, GREEDY)
    engine = make_engine(next_dir, k)
    assert_same(engine.generate(ps, GREEDY), want)
    st = engine.stats
    assert st.spec_decode_num_draft_tokens > 0 and len(st.spec_decode_accepted_per_pos) == k
    assert sum(st.spec_decode_accepted_per_pos) == st.spec_decode_num_accepted_tokens
    assert st.num_generated_tokens == 5 * GREEDY.max_tokens
    assert st.num_kv_blocks_used == 0


def test_chunked_prefill_preemption_and_stops_with_speculation(next_dir):
    """A small step budget (prompts in chunks, drafts cut to the budget), a KV pool too small for
    every sequence (preemption and recompute), min_tokens, stop ids and penalties: the greedy
    tokens equal those without speculation."""
    ps = prompts(7, 6, 10, 40)
    params = [GREEDY,
              SamplingParams(temperature=0, max_tokens=15, min_tokens=5, stop_token_ids=(7, 11, 13, 200)),
              SamplingParams(temperature=0, max_tokens=18, repetition_penalty=1.3, frequency_penalty=0.5),
              SamplingParams(temperature=0, max_tokens=3),
              SamplingParams(temperature=0, max_tokens=1),
              SamplingParams(temperature=0, max_tokens=25, presence_penalty=1.0, logit_bias={5: 3.0})]
    want = make_engine(next_dir, 0, num_kv_blocks=24, budget=12, slots=6).generate(ps, params)
    for k in (2, 3):
        engine = make_engine(next_dir, k, num_kv_blocks=24, budget=12, slots=6)
        assert_same(engine.generate(ps, params), want)
        assert engine.stats.num_preemptions > 0 and engine.stats.num_kv_blocks_used == 0


def oracle_drafts(engine: LLMEngine, want: list[Completion], ps: list[list[int]], wrong: float, seed: int,
                  ) -> None:
    """Replace the MTP's drafts (which a random-weight model's drafter rarely gets right) by the
    tokens the engine without speculation produced, each wrong with probability `wrong`: partial
    acceptance at every draft position, so the rollback runs after 0, 1, .. k accepted drafts."""
    rng = random.Random(seed)
    by_prompt = {tuple(p): w.token_ids for p, w in zip(ps, want, strict=True)}
    propose = engine._propose

    def patched(sched, emitted):
        propose(sched, emitted)
        for c in sched.chunks:
            seq = c.seq
            n, d = seq.num_output_tokens, len(seq.draft_token_ids)
            true = list(by_prompt[tuple(seq.prompt_token_ids)][n:n + d])
            seq.draft_token_ids = [t if rng.random() > wrong else (t + 1) % 380 for t in true]

    engine._propose = patched


@pytest.mark.parametrize("k", [1, 3])
def test_partial_acceptance_rolls_back_exactly(next_dir, k):
    ps = prompts(11 + k, 6, 10, 40)
    base = make_engine(next_dir, 0, num_kv_blocks=30, budget=16, slots=6)
    want = base.generate(ps, GREEDY)
    engine = make_engine(next_dir, k, num_kv_blocks=30, budget=16, slots=6)
    oracle_drafts(engine, want, ps, wrong=0.25, seed=k)
    assert_same(engine.generate(ps, GREEDY), want)
    st = engine.stats
    assert 0 < st.spec_decode_num_accepted_tokens < st.spec_decode_num_draft_tokens
    assert all(n > 0 for n in st.spec_decode_accepted_per_pos)
    assert st.num_steps < base.stats.num_steps


def test_prefix_cache_hits_with_speculation(next_dir):
    """Chat turns that resume from cached prefixes (blocks and saved DeltaNet states, which are only
    ever of accepted tokens) give the tokens of an engine without speculation or cache."""
    off = make_engine(next_dir, 0, cache=False)
    on = make_engine(next_dir, 2)
    rng = random.Random(3)
    system = [rng.randrange(3, 380) for _ in range(13)]
    hist_on, hist_off = list(system), list(system)
    for turn in range(3):
        msg = [rng.randrange(3, 380) for _ in range(5 + turn)]
        hist_on += msg
        hist_off += msg
        a, b = on.generate([list(hist_on)], GREEDY)[0], off.generate([list(hist_off)], GREEDY)[0]
        assert_same([a], [b])
        hist_on += a.token_ids
        hist_off += b.token_ids
    assert on.stats.prefix_cache_hit_tokens > 0


def test_trained_model_accepts_most_first_drafts_with_identical_tokens():
    from engine.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(TRAINED)
    texts = ["def read_file(path):\n    \"\"\"Return", "The os module provides a portable way of",
             "Return a new list containing"]
    ps = [tok.encode(t) for t in texts]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=True)

    def engine(k: int) -> LLMEngine:
        ex = LocalExecutor(TRAINED, dtype="float32", num_slots=4, max_model_len=256, speculative_tokens=k)
        return LLMEngine(ex, tokenizer=tok)

    base = engine(0)
    want = base.generate(ps, params)
    for k in (1, 3):
        e = engine(k)
        assert_same(e.generate(ps, params), want)
        st = e.stats
        assert st.spec_decode_accepted_per_pos[0] >= 0.5 * st.spec_decode_num_drafts
        assert st.num_steps < 0.8 * base.stats.num_steps  # accepted drafts save steps


def test_sampling_with_speculation_is_seeded_and_well_formed(next_dir):
    params = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=12, seed=5, ignore_eos=True, logprobs=True,
                            top_logprobs=2)
    ps = prompts(9, 3)
    a = make_engine(next_dir, 2).generate(ps, params)
    b = make_engine(next_dir, 2).generate(ps, params)
    for x, y in zip(a, b, strict=True):
        assert x.token_ids == y.token_ids and len(x.token_ids) == 12 and len(x.logprobs) == 12


def test_speculation_needs_an_mtp_layer(tmp_path):
    from model.tiny import make_tiny_model

    moe = make_tiny_model(tmp_path / "moe", arch="qwen3_moe")
    with pytest.raises(ValueError, match=r"engine\.speculative_tokens=2"):
        LocalExecutor(moe, dtype="float32", num_slots=2, max_model_len=64, speculative_tokens=2)


def test_structured_outputs_run_unspeculated_beside_speculating_requests(next_dir):
    """A request with a grammar drafts nothing (its mask applies as without speculation); its
    neighbours still speculate, and both give the tokens of an engine without speculation."""
    import re

    from engine.structured_output import StructuredOutputsParams
    from engine.tokenizer import Tokenizer

    def engine(k: int) -> LLMEngine:
        ex = LocalExecutor(next_dir, dtype="float32", num_slots=4, max_model_len=256, speculative_tokens=k)
        return LLMEngine(ex, tokenizer=Tokenizer(next_dir))

    ps = prompts(21, 2)
    params = [SamplingParams(temperature=0, max_tokens=12,
                             structured_outputs=StructuredOutputsParams(regex=r"[a-c]{2,4}-\d\d")), GREEDY]
    base = engine(0)
    want = base.generate(ps, params)
    spec = engine(2)
    got = spec.generate(ps, params)
    assert_same(got, want)
    assert re.fullmatch(r"[a-c]{2,4}-\d\d", got[0].text)
    assert spec.stats.spec_decode_num_draft_tokens > 0
