"""The engine over the real `local` executor and tiny random-weight models: a packed batch and
chunked prefill must give exactly what each prompt gives alone, and greedy tokens must equal
transformers' own generate()."""

import pytest
import torch

from engine.executor import create_executor
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from model.config import ModelConfig

PROMPTS = [[5, 9, 13, 2, 77, 31, 8], [101], [3, 3, 3, 250, 17], [44, 12, 90, 6, 6, 200, 7, 7, 19, 60, 2]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=True)
SEEDED = SamplingParams(temperature=0.9, top_k=20, top_p=0.9, seed=7, max_tokens=6, ignore_eos=True,
                        logprobs=True)


@pytest.fixture(scope="module", params=["qwen3_next", "qwen3_moe"])
def tiny_dir(request, tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param)


def engine(model_dir, num_slots: int = 4, **kwargs) -> LLMEngine:
    executor = create_executor("local", model_dir=model_dir, num_slots=num_slots, max_model_len=64)
    return LLMEngine(executor, **kwargs)


def logprob_atol(model_dir) -> float:
    """Float32 noise, not a tolerance for bugs. The tiny Qwen3-Next is ill-conditioned at a few
    positions (a DeltaNet head whose output is near zero before its gated RMSNorm): there its
    float32 logits are ~2e-4 off a float64 run whichever path computes them, so a packed and a
    one-sequence run can differ by that much; the Qwen3 MoE model stays within 1e-5."""
    return 1e-4 if ModelConfig.from_dir(model_dir).arch == "qwen3_moe" else 5e-4


def assert_same(results, expected, atol: float):
    for r, e in zip(results, expected, strict=True):
        assert r.token_ids == e.token_ids
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(e.logprobs), rtol=0, atol=atol)


@pytest.mark.parametrize("params", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_batch_equals_each_prompt_alone(tiny_dir, params):
    alone = [engine(tiny_dir, num_slots=1).generate([p], params)[0] for p in PROMPTS]
    # Two slots for four prompts: slots are reused by later requests, with decode and prefill mixed.
    atol = logprob_atol(tiny_dir)
    assert_same(engine(tiny_dir, num_slots=2).generate(PROMPTS, params), alone, atol)
    assert_same(engine(tiny_dir, num_slots=4).generate(PROMPTS, params), alone, atol)


def test_chunked_prefill_equals_unchunked(tiny_dir):
    whole = engine(tiny_dir, max_num_batched_tokens=256).generate(PROMPTS, GREEDY)
    chunked = engine(tiny_dir, max_num_batched_tokens=4)
    assert_same(chunked.generate(PROMPTS, GREEDY), whole, logprob_atol(tiny_dir))
    assert chunked.stats.num_prompt_tokens == sum(map(len, PROMPTS))


def test_greedy_tokens_equal_transformers_generate(hf_dir):
    from tests.hf_models import load_hf_model

    hf = load_hf_model(hf_dir)
    results = engine(hf_dir, num_slots=2).generate(PROMPTS, GREEDY)
    for p, r in zip(PROMPTS, results, strict=True):
        with torch.no_grad():
            out = hf.generate(torch.tensor([p]), max_new_tokens=6, do_sample=False, eos_token_id=None,
                              pad_token_id=0)
        assert list(r.token_ids) == out[0, len(p):].tolist()


def test_logits_of_a_packed_step(tiny_dir):
    """Logits at every prompt position of a packed two-sequence prefill equal a one-sequence run."""
    from engine.executor import StepInput

    a, b = PROMPTS[0], PROMPTS[3]
    ex = create_executor("local", model_dir=tiny_dir, num_slots=2, max_model_len=32)
    packed = ex.execute(StepInput(tuple(a + b), (1, 0), (0, 0), (len(a), len(b)),
                                  tuple(range(len(a) + len(b)))))
    assert packed.dtype == torch.float32 and packed.shape == (len(a) + len(b), ex.config.vocab_size)
    alone = ex.execute(StepInput(tuple(b), (1,), (0,), (len(b),), tuple(range(len(b)))))
    torch.testing.assert_close(packed[len(a):], alone, rtol=0, atol=logprob_atol(tiny_dir))
