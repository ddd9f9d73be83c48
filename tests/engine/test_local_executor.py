"""The engine over the real `local` executor and tiny random-weight models: a packed batch and
chunked prefill must give exactly what each prompt gives alone, and greedy tokens must equal
transformers' own generate()."""

import pytest
import torch

from engine.llm_engine import LLMEngine
from engine.local_executor import LocalExecutor
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
    executor = LocalExecutor(model_dir=model_dir, num_slots=num_slots, max_model_len=64)
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
    ex = LocalExecutor(model_dir=tiny_dir, num_slots=2, max_model_len=32)
    packed = ex.execute(StepInput(tuple(a + b), (1, 0), (0, 0), (len(a), len(b)),
                                  tuple(range(len(a) + len(b)))))
    assert packed.dtype == torch.float32 and packed.shape == (len(a) + len(b), ex.config.vocab_size)
    alone = ex.execute(StepInput(tuple(b), (1,), (0,), (len(b),), tuple(range(len(b)))))
    torch.testing.assert_close(packed[len(a):], alone, rtol=0, atol=logprob_atol(tiny_dir))



def test_logits_with_shuffled_block_tables_equal_the_default_tables(tiny_dir):
    """The same steps (chunked prefill, mixed decode) through random non-contiguous block tables of
    a smaller pool give the logits of the default slot-contiguous tables."""
    from dataclasses import replace

    from engine.executor import StepInput

    default = LocalExecutor(model_dir=tiny_dir, dtype="float32", num_slots=3, max_model_len=32,
                              block_size=4)
    paged = LocalExecutor(model_dir=tiny_dir, dtype="float32", num_slots=3, max_model_len=32,
                            block_size=4, num_kv_blocks=13)
    assert default.num_kv_blocks == 24 and paged.num_kv_blocks == 13
    ids = torch.randperm(13, generator=torch.Generator().manual_seed(0)).tolist()
    tables = (ids[0:4], ids[4:8], ids[8:12])  # by slot: 16 tokens each, in scattered blocks
    g = torch.Generator().manual_seed(1)

    def toks(n: int) -> tuple[int, ...]:
        return tuple(torch.randint(0, default.config.vocab_size, (n,), generator=g).tolist())

    def with_tables(step: StepInput, by_slot) -> StepInput:
        return replace(step, block_tables=tuple(tuple(by_slot[s][:-(-(start + n) // 4)]) for s, start, n
                                                in zip(step.slots, step.starts, step.lengths, strict=True)))

    steps = [StepInput(toks(14), (0, 1, 2), (0, 0, 0), (6, 3, 5), tuple(range(14))),
             StepInput(toks(9), (0, 1, 2), (6, 3, 5), (1, 7, 1), (0, 7, 8)),
             StepInput(toks(3), (2, 0, 1), (6, 7, 10), (1, 1, 1), (0, 1, 2)),
             StepInput(toks(7), (1, 2), (11, 7), (5, 2), (4, 6))]
    for step in steps:
        torch.testing.assert_close(paged.execute(with_tables(step, tables)), default.execute(step),
                                   rtol=0, atol=1e-6)
    # The tables are what the cache follows: slot 0 decoding over slot 1's blocks reads slot 1's keys.
    decode = StepInput(toks(1), (0,), (7,), (1,), (0,))
    wrong = with_tables(decode, {0: tables[1]})
    assert not torch.allclose(paged.execute(wrong), default.execute(decode), rtol=0, atol=1e-4)


def test_preemption_under_a_small_kv_pool_keeps_the_greedy_tokens(tiny_dir):
    """Four prompts that end with 18 blocks of 4 tokens between them, in a pool of 9: sequences
    are preempted and recomputed (DeltaNet state included) and still produce the greedy tokens of
    an engine with room for all."""
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    small = LLMEngine(LocalExecutor(model_dir=tiny_dir, num_slots=4, max_model_len=64,
                                      block_size=4, num_kv_blocks=9), max_num_batched_tokens=8)
    got = small.generate(PROMPTS, params)
    assert small.stats.num_preemptions > 0
    full = engine(tiny_dir).generate(PROMPTS, params)
    assert [r.token_ids for r in got] == [r.token_ids for r in full]
