import random
from dataclasses import FrozenInstanceError

import pytest
import torch

from engine.sampling import History, Sampler, SamplingParams, SamplingParamsError, filtered_probs

V = 50


def logits(rows: int = 4, seed: int = 0) -> torch.Tensor:
    return 3 * torch.randn(rows, V, generator=torch.Generator().manual_seed(seed))


def gens(params):
    return [p.make_generator("cpu") for p in params]


def test_greedy_is_argmax():
    x = logits()
    out = Sampler()(x, [SamplingParams(temperature=0)] * 4)
    assert out.token_ids.tolist() == x.argmax(-1).tolist()


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1.0, top_k=1, seed=3),
    SamplingParams(temperature=5.0, top_p=1e-6, seed=3),
    SamplingParams(temperature=1.0, top_k=1, top_p=0.5, seed=3),
])
def test_top_k_1_and_tiny_top_p_are_greedy(params):
    x = logits(rows=8)
    for _ in range(5):
        out = Sampler()(x, [params] * 8, gens([params] * 8))
        assert out.token_ids.tolist() == x.argmax(-1).tolist()


def test_logprobs_are_log_softmax_of_raw_logits_at_chosen_ids():
    x = logits()
    params = [SamplingParams(temperature=0), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.3, top_k=5, seed=2),
              SamplingParams(temperature=1, top_p=0.8, seed=3)]
    out = Sampler()(x, params, gens(params))
    expected = torch.log_softmax(x, -1).gather(1, out.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, expected, rtol=0, atol=1e-6)
    assert out.logprobs.dtype == torch.float32


def draws(x_row: torch.Tensor, params: SamplingParams, position: int, batch: int, n: int = 20) -> list[int]:
    """n draws of one seeded request that sits at `position` in a batch of `batch` rows whose
    other rows are different requests (greedy and sampled, unseeded and seeded)."""
    others = [SamplingParams(temperature=0), SamplingParams(temperature=1.0),
              SamplingParams(temperature=0.5, seed=99, top_k=7)]
    sampler, gen = Sampler(), params.make_generator("cpu")
    other_gens = [o.make_generator("cpu") for o in others]
    out = []
    for step in range(n):
        x = logits(rows=batch, seed=1000 + step)
        x[position] = x_row
        row_params = [others[i % 3] for i in range(batch)]
        row_gens = [other_gens[i % 3] for i in range(batch)]
        row_params[position], row_gens[position] = params, gen
        out.append(int(sampler(x, row_params, row_gens).token_ids[position]))
    return out


def test_seeded_sampling_is_reproducible_and_independent_of_batch_position():
    x_row = logits(rows=1, seed=5)[0] / 3  # flat enough that draws differ
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    alone = draws(x_row, params, position=0, batch=1)
    assert len(set(alone)) > 3, "the test needs varied draws"
    assert draws(x_row, params, position=0, batch=1) == alone
    assert draws(x_row, params, position=2, batch=5) == alone
    assert draws(x_row, params, position=0, batch=3) == alone
    assert draws(x_row, SamplingParams(temperature=1.0, top_p=0.95, seed=1235), 0, 1) != alone


def test_sampling_frequencies_follow_the_distribution():
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    x = p.log()[None].repeat(4000, 1)
    params = [SamplingParams(temperature=1.0, seed=i) for i in range(4000)]
    out = Sampler()(x, params, gens(params)).token_ids
    freq = torch.bincount(out, minlength=4).float() / 4000
    torch.testing.assert_close(freq, p, rtol=0, atol=0.03)


@pytest.mark.parametrize("top_k, top_p, allowed", [
    (2, 1.0, {0, 1}),
    (0, 0.75, {0, 1}),  # 0.5 < 0.75 <= 0.5 + 0.3
    (-1, 0.5, {0}),  # the mass before token 1 already reaches 0.5
    (3, 0.9, {0, 1, 2}),
])
def test_top_k_and_top_p_restrict_the_support(top_k, top_p, allowed):
    x = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()[None].repeat(500, 1)
    params = [SamplingParams(temperature=1.0, top_k=top_k, top_p=top_p, seed=i) for i in range(500)]
    out = set(Sampler()(x, params, gens(params)).token_ids.tolist())
    assert out == allowed


def test_low_temperature_concentrates_on_the_argmax():
    x = torch.tensor([1.0, 0.9, 0.0])[None].repeat(200, 1)  # p(1) = e^-20 at temperature 0.005
    params = [SamplingParams(temperature=0.005, seed=i) for i in range(200)]
    assert set(Sampler()(x, params, gens(params)).token_ids.tolist()) == {0}


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1), "temperature must be >= 0, got -1"),
    (dict(temperature=float("nan")), "temperature must be >= 0, got nan"),
    (dict(max_tokens=0), "max_tokens must be >= 1, got 0"),
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(top_k=-2), "top_k must be -1, 0 (off) or >= 1, got -2"),
    (dict(seed="7"), "seed must be an integer, got '7'"),
    (dict(stop_token_ids=[3, -1]), "stop_token_ids must hold token ids >= 0, got -1"),
    # Values that would overflow a tensor op and fail the whole batch's step are refused here.
    (dict(temperature=float("inf")), "temperature must be at most 3.403e+38 (float32), got inf"),
    (dict(temperature=10**39), f"temperature must be at most 3.403e+38 (float32), got {10**39}"),
    (dict(seed=2**64), "seed must be in [-2**63, 2**64), got 18446744073709551616"),
    (dict(seed=-(2**63) - 1), "seed must be in [-2**63, 2**64), got -9223372036854775809"),
    (dict(stop_token_ids=[2**63]), "stop_token_ids must hold token ids < 2**63, got 9223372036854775808"),
])
def test_params_validation_names_field_and_value(kwargs, message):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert str(e.value) == message
    assert e.value.field == next(iter(kwargs))


def test_params_are_frozen_and_keep_a_tuple():
    p = SamplingParams(stop_token_ids=[5, 6])
    assert p.stop_token_ids == (5, 6)
    with pytest.raises(FrozenInstanceError):
        p.temperature = 0.0  # type: ignore[misc]
    assert SamplingParams(top_k=-1) == SamplingParams(top_k=-1)


def test_sampler_checks_row_count():
    with pytest.raises(ValueError, match="2 logit rows but 1 sampling params"):
        Sampler()(logits(rows=2), [SamplingParams()])


@pytest.mark.parametrize("top_k", [V, V + 1, 2**63, 10**30])
def test_top_k_beyond_the_vocabulary_means_every_token(top_k):
    x = logits(rows=3)
    off = [SamplingParams(temperature=1.0, seed=s) for s in range(3)]
    big = [SamplingParams(temperature=1.0, seed=s, top_k=top_k) for s in range(3)]
    assert Sampler()(x, big, gens(big)).token_ids.tolist() == Sampler()(x, off, gens(off)).token_ids.tolist()


@pytest.mark.parametrize("seed", [-(2**63), -1, 0, 2**64 - 1])
def test_every_seed_allowed_makes_a_generator(seed):
    assert SamplingParams(seed=seed).make_generator("cpu") is not None


# -- penalties, logit_bias, min_tokens, min_p: against transformers' logits processors ---------
EOS_IDS = (1, 7)


def reference_probs(x: torch.Tensor, p: SamplingParams, h: History) -> torch.Tensor:
    """One row through transformers' processors in vLLM v1's order: logit_bias, min_tokens and
    the penalties on raw logits, then temperature, min_p, top-k, top-p. Frequency and presence
    penalties have no transformers processor: a plain loop over the output tokens."""
    from transformers.generation.logits_process import (
        MinNewTokensLengthLogitsProcessor,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        SequenceBiasLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    ids = torch.tensor([list(h.prompt_token_ids) + list(h.output_token_ids)])  # [1, L]
    scores = x[None].clone()
    if p.logit_bias:
        scores = SequenceBiasLogitsProcessor({(t,): float(b) for t, b in p.logit_bias})(ids, scores)
    stops = list(p.stop_token_ids) + ([] if p.ignore_eos else list(EOS_IDS))
    if p.min_tokens:
        scores = MinNewTokensLengthLogitsProcessor(len(h.prompt_token_ids), p.min_tokens, stops)(ids, scores)
    if p.repetition_penalty != 1:
        scores = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, scores)
    for t in set(h.output_token_ids):
        scores[0, t] -= p.frequency_penalty * list(h.output_token_ids).count(t) + p.presence_penalty
    if p.greedy:
        return torch.nn.functional.one_hot(scores[0].argmax(), V).float()
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.min_p:
        scores = MinPLogitsWarper(p.min_p)(ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return torch.softmax(scores[0], -1)


def ours(x: torch.Tensor, params: list[SamplingParams], hs: list[History]) -> torch.Tensor:
    """The sampler's distribution for each row: one-hot at the argmax for greedy rows."""
    adjusted = Sampler(EOS_IDS).adjusted_logits(x, params, hs)
    probs = torch.nn.functional.one_hot(adjusted.argmax(-1), V).float()
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        probs[sampled] = filtered_probs(adjusted[sampled], [params[i] for i in sampled])
    return probs


def random_case(rng: random.Random) -> tuple[SamplingParams, History]:
    """Params with each option on or off at random, and a history whose tokens repeat."""
    pool = rng.sample(range(V), 12)
    h = History(prompt_token_ids=[rng.choice(pool) for _ in range(rng.randrange(1, 15))],
                output_token_ids=[rng.choice(pool) for _ in range(rng.randrange(0, 12))])
    on = rng.random
    p = SamplingParams(
        max_tokens=40, temperature=0 if on() < 0.25 else rng.uniform(0.3, 2),
        presence_penalty=rng.uniform(-2, 2) if on() < 0.5 else 0,
        frequency_penalty=rng.uniform(-2, 2) if on() < 0.5 else 0,
        repetition_penalty=rng.uniform(0.5, 2.5) if on() < 0.5 else 1,
        min_p=rng.uniform(0, 0.5) if on() < 0.4 else 0, top_k=rng.randrange(1, V) if on() < 0.3 else 0,
        top_p=rng.uniform(0.3, 1) if on() < 0.3 else 1,
        logit_bias={t: rng.uniform(-100, 100) for t in rng.sample(range(V), rng.randrange(4))},
        min_tokens=rng.randrange(0, 20) if on() < 0.4 else 0, ignore_eos=on() < 0.3,
        stop_token_ids=rng.sample(range(V), rng.randrange(3)))
    return p, h


@pytest.mark.parametrize("seed", range(6))
def test_batched_options_match_transformers_processors_row_by_row(seed):
    rng = random.Random(seed)
    cases = [random_case(rng) for _ in range(16)]
    params, hs = [c[0] for c in cases], [c[1] for c in cases]
    x = logits(rows=16, seed=seed)
    got = ours(x, params, hs)
    for i in range(16):
        torch.testing.assert_close(got[i], reference_probs(x[i], params[i], hs[i]), rtol=1e-4, atol=1e-6,
                                   msg=lambda m, i=i: f"row {i} {params[i]}: {m}")


@pytest.mark.parametrize("params", [
    SamplingParams(repetition_penalty=1.7), SamplingParams(repetition_penalty=0.6),
    SamplingParams(presence_penalty=1.5), SamplingParams(frequency_penalty=-0.7),
    SamplingParams(min_p=0.2, temperature=0.8), SamplingParams(logit_bias={3: 5.0, 9: -100}),
    SamplingParams(min_tokens=5, stop_token_ids=[4]),
    SamplingParams(min_tokens=5, ignore_eos=True, stop_token_ids=[10]),
], ids=lambda p: ",".join(f"{k}={v}" for k, v in vars(p).items() if v != getattr(SamplingParams(), k)))
def test_each_option_alone_matches_its_processor(params):
    h = History(prompt_token_ids=[3, 3, 5, 1, 4], output_token_ids=[5, 9, 9, 3])  # under min_tokens
    x = logits(rows=1, seed=11)[0]
    torch.testing.assert_close(ours(x[None], [params], [h])[0], reference_probs(x, params, h),
                               rtol=1e-4, atol=1e-6)
    assert not torch.equal(Sampler(EOS_IDS).adjusted_logits(x[None], [params], [h])[0], x) or params.min_p


def test_options_change_nothing_at_their_neutral_values_and_leave_the_raw_logits():
    x = logits(rows=3)
    raw = x.clone()
    params = [SamplingParams(temperature=0, presence_penalty=0, frequency_penalty=0, repetition_penalty=1,
                             min_p=0, logit_bias={}, min_tokens=0)] * 3
    hs = [History([2, 3], [4, 4])] * 3
    assert Sampler(EOS_IDS).adjusted_logits(x, params, hs) is x
    hot = [SamplingParams(temperature=0, repetition_penalty=2, logit_bias={0: 50}, min_tokens=9)] * 3
    out = Sampler(EOS_IDS)(x, hot, None, hs)
    assert torch.equal(x, raw)  # the raw logits give the logprobs, and the caller's top logprobs
    torch.testing.assert_close(out.logprobs, torch.log_softmax(raw, -1)[:, 0])  # forced by the bias


def test_min_tokens_masks_eos_and_stop_ids_until_enough_are_out():
    x = torch.full((3, V), -5.0)
    x[:, 1] = 10  # EOS is by far the likeliest
    x[:, 4] = 5  # then a stop token id
    p = SamplingParams(temperature=0, min_tokens=3, stop_token_ids=[4])
    hs = [History([2], [8] * n) for n in (0, 2, 3)]  # 0, 2, then 3 tokens out
    first, second, third = Sampler(EOS_IDS)(x, [p] * 3, None, hs).token_ids.tolist()
    assert first not in (1, 4, 7) and second not in (1, 4, 7) and third == 1
    no_eos = SamplingParams(temperature=0, min_tokens=3, ignore_eos=True)  # EOS does not stop it
    assert Sampler(EOS_IDS)(x[:1], [no_eos], None, hs[:1]).token_ids.tolist() == [1]


def test_penalties_count_output_tokens_and_repetition_sees_the_prompt():
    x = torch.zeros(1, V)
    x[0, :4] = torch.tensor([2.0, 1.0, -1.0, 0.5])
    h = History(prompt_token_ids=[0, 2], output_token_ids=[1, 1, 3])
    got = Sampler().adjusted_logits(x, [SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)], [h])
    assert got[0, :4].tolist() == [2.0, 1.0 - 1.0 - 0.25, -1.0, 0.5 - 0.5 - 0.25]  # prompt not counted
    got = Sampler().adjusted_logits(x, [SamplingParams(repetition_penalty=2.0)], [h])
    assert got[0, :4].tolist() == [1.0, 0.5, -2.0, 0.25] and got[0, 4:].eq(0).all()


def test_seeded_draws_with_every_option_are_reproducible_in_any_batch():
    x_row = logits(rows=1, seed=5)[0] / 3
    h = History([3, 4, 5], [6, 6, 7])
    params = SamplingParams(temperature=1.0, min_p=0.01, presence_penalty=0.5, repetition_penalty=1.3,
                            logit_bias={2: 1.0}, seed=77)

    def run(position: int, batch: int) -> list[int]:
        gen, out = params.make_generator("cpu"), []
        others = [SamplingParams(temperature=0.7, frequency_penalty=1.0, seed=5),
                  SamplingParams(temperature=0)]
        for step in range(15):
            x = logits(rows=batch, seed=500 + step)
            x[position] = x_row
            ps = [others[i % 2] for i in range(batch)]
            ps[position] = params
            gs = [p.make_generator("cpu") for p in ps]
            gs[position] = gen
            out.append(int(Sampler()(x, ps, gs, [h] * batch).token_ids[position]))
        return out

    alone = run(0, 1)
    assert len(set(alone)) > 2 and run(2, 4) == alone and run(1, 2) == alone


@pytest.mark.parametrize("kwargs, field, message", [
    (dict(presence_penalty=2.5), "presence_penalty", "presence_penalty must be in [-2, 2], got 2.5"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty",
     "frequency_penalty must be in [-2, 2], got nan"),
    (dict(repetition_penalty=0), "repetition_penalty",
     "repetition_penalty must be > 0 (1: off) and finite, got 0"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty",
     "repetition_penalty must be > 0 (1: off) and finite, got inf"),
    (dict(min_p=1.5), "min_p", "min_p must be in [0, 1], got 1.5"),
    (dict(min_p=-0.1), "min_p", "min_p must be in [0, 1], got -0.1"),
    (dict(min_tokens=-1), "min_tokens", "min_tokens must be >= 0, got -1"),
    (dict(min_tokens=20, max_tokens=10), "min_tokens", "min_tokens must be at most max_tokens (10), got 20"),
    (dict(logit_bias={5: 101}), "logit_bias", "logit_bias must map to biases in [-100, 100], got 101"),
    (dict(logit_bias={-1: 1}), "logit_bias", "logit_bias must map token ids in [0, 2**63), got -1"),
    (dict(logit_bias={"5": 1}), "logit_bias", "logit_bias must map token ids in [0, 2**63), got '5'"),
    (dict(logit_bias=[(5, 1), (5, 2)]), "logit_bias", "logit_bias names a token id twice"),
    (dict(logit_bias=7), "logit_bias", "logit_bias must map token ids to biases, got 7"),
])
def test_new_params_validation_names_the_field(kwargs, field, message):
    with pytest.raises(SamplingParamsError) as e:
        SamplingParams(**kwargs)
    assert (e.value.field, str(e.value)) == (field, message)


def test_logit_bias_is_kept_as_sorted_pairs():
    p = SamplingParams(logit_bias={9: -1.0, 2: 3})
    assert p.logit_bias == ((2, 3), (9, -1.0))
    assert hash(p) == hash(SamplingParams(logit_bias=[(2, 3), (9, -1.0)]))
