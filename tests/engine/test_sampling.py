from dataclasses import FrozenInstanceError

import pytest
import torch

from engine.sampling import Sampler, SamplingParams, SamplingParamsError

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
