"""The local executor with `compile`: its decode steps (model/compiled.py) give eager's greedy
tokens and logprobs on both tiny architectures, a batch of 3 padded to the bucket of 4, and the
gate tap counts the same experts."""

from __future__ import annotations

import pytest
import torch

from engine.executor import StepInput
from engine.llm_engine import LLMEngine
from engine.local_executor import LocalExecutor
from engine.sampling import SamplingParams

PROMPTS = [[5, 9, 13, 2, 77, 31, 8], [101], [3, 3, 3, 250, 17]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module", params=["qwen3_next", "qwen3_moe"])
def tiny_dir(request, tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param)


def executor(model_dir, compile: bool) -> LocalExecutor:
    return LocalExecutor(model_dir, num_slots=4, max_model_len=64, block_size=8, compile=compile)


def test_compiled_decode_generates_what_eager_does(tiny_dir):
    compiled = executor(tiny_dir, compile=True)
    results = LLMEngine(compiled).generate(PROMPTS, GREEDY)
    expected = LLMEngine(executor(tiny_dir, compile=False)).generate(PROMPTS, GREEDY)
    for r, e in zip(results, expected, strict=True):
        assert r.token_ids == e.token_ids
        # tests/engine/test_local_executor.py's float32 noise bound for the tiny models.
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(e.logprobs), rtol=0, atol=5e-4)
    assert compiled.decode is not None and set(compiled.decode.compile_seconds) == {4}


def test_compiled_decode_counts_the_same_experts(tiny_dir):
    compiled, eager = executor(tiny_dir, compile=True), executor(tiny_dir, compile=False)
    prefill = StepInput((5, 9, 13, 101, 3, 3), (0, 2, 1), (0, 0, 0), (3, 1, 2), (2, 3, 5),
                        ((0, 1), (4, 5), (2, 3)))
    decode = StepInput((7, 8, 9), (0, 2, 1), (3, 1, 2), (1, 1, 1), (0, 1, 2), ((0, 1), (4, 5), (2, 3)))
    assert compiled._takes_lists(decode) and not compiled._takes_lists(prefill)
    for step in (prefill, decode):
        torch.testing.assert_close(compiled.execute(step), eager.execute(step), rtol=0, atol=1e-3)
        assert compiled.take_expert_counts() == eager.take_expert_counts()


class NoCompiler:
    """A torch.compile backend that fails as inductor does without a C++ compiler (dynamo wraps
    it in BackendCompilerFailed): counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.calls += 1
        raise RuntimeError("no working C++ compiler found (simulated)")


def failing_executor(model_dir) -> tuple[LocalExecutor, NoCompiler]:
    from model.decode_math import decode_layers

    ex, backend = executor(model_dir, compile=True), NoCompiler()
    ex.decode.layers_fn = torch.compile(decode_layers, backend=backend, fullgraph=True)
    return ex, backend


def test_a_compile_that_fails_on_first_use_runs_eagerly(tiny_dir, caplog):
    """`nextserve generate --compile` compiles a bucket on its first step: a compile that raises
    there is logged, that step runs eagerly (the compile ran on scratch rows only, so no sequence's
    state was touched) and so do the later ones, without compiling again."""
    failing, backend = failing_executor(tiny_dir)
    with caplog.at_level("WARNING", logger="engine.local_executor"):
        results = LLMEngine(failing).generate(PROMPTS, GREEDY)
    expected = LLMEngine(executor(tiny_dir, compile=False)).generate(PROMPTS, GREEDY)
    for r, e in zip(results, expected, strict=True):
        assert r.token_ids == e.token_ids
        torch.testing.assert_close(torch.tensor(r.logprobs), torch.tensor(e.logprobs), rtol=0, atol=1e-5)
    assert backend.calls == 1  # once, not at every step
    assert failing.compiled_buckets() == ((), False)
    assert "simulated" in failing.compile_error()
    (warning,) = [r.getMessage() for r in caplog.records if "batch bucket 4 failed" in r.getMessage()]
    assert "eagerly" in warning and "simulated" in warning


def test_a_background_compile_that_fails_leaves_serving_eager_and_says_so(tiny_dir):
    """A serving engine's background compile that raises: logged, every decode step stays eager,
    and the engine's stats (a replica's /stats) carry the error."""
    failing, backend = failing_executor(tiny_dir)
    failing.decode.compile_in_background().join(timeout=120)
    assert not failing.decode.compiling and backend.calls == 1
    engine = LLMEngine(failing)
    results = engine.generate(PROMPTS, GREEDY)
    expected = LLMEngine(executor(tiny_dir, compile=False)).generate(PROMPTS, GREEDY)
    assert [r.token_ids for r in results] == [e.token_ids for e in expected]
    stats = engine.stats
    assert stats.compiled_buckets == () and not stats.compiling
    assert "compiled decode" in stats.compile_error and "simulated" in stats.compile_error
    assert backend.calls == 1
    assert LLMEngine(executor(tiny_dir, compile=False)).stats.compile_error == ""


def run_staggered(model_dir, compile: bool) -> tuple[dict[str, list], int]:
    """One request decoding when two more arrive: the step that prefills them decodes it too.
    Returns each request's (token, logprob) pairs and how many steps were split."""
    ex = executor(model_dir, compile)
    splits = []
    split = ex._split_one_token_rows
    ex._split_one_token_rows = lambda step: splits.append(split(step)) or splits[-1]
    engine = LLMEngine(ex)
    out: dict[str, list] = {}

    def step() -> None:
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(zip(o.new_token_ids, o.new_logprobs, strict=True))

    engine.add_request("a", PROMPTS[0], GREEDY)
    for _ in range(3):  # its prefill and two decode steps (which compile bucket 1)
        step()
    engine.add_request("b", PROMPTS[2], GREEDY)
    engine.add_request("c", [44, 12, 90, 6], GREEDY)
    while engine.has_unfinished():
        step()
    return out, sum(s is not None for s in splits)


def test_mixed_step_runs_its_decode_rows_compiled(tiny_dir):
    """The decode row of a mixed step goes through the compiled bucket, the prompts eagerly; the
    tokens and logprobs are eager's, and so are the expert counts of that step."""
    compiled, num_split = run_staggered(tiny_dir, compile=True)
    eager, _ = run_staggered(tiny_dir, compile=False)
    assert num_split >= 1
    for rid in ("a", "b", "c"):
        assert [t for t, _ in compiled[rid]] == [t for t, _ in eager[rid]]
        torch.testing.assert_close(torch.tensor([p for _, p in compiled[rid]]),
                                   torch.tensor([p for _, p in eager[rid]]), rtol=0, atol=5e-4)


def test_mixed_step_counts_the_same_experts(tiny_dir):
    compiled, eager = executor(tiny_dir, compile=True), executor(tiny_dir, compile=False)
    prompt = StepInput((5, 9, 13), (0,), (0,), (3,), (2,), ((0, 1),))
    decode = StepInput((7,), (0,), (3,), (1,), (0,), ((0, 1),))  # compiles bucket 1
    mixed = StepInput((8, 101, 3, 3), (0, 1), (4, 0), (1, 3), (0, 3), ((0, 1), (2, 3)))  # bucket 1 again
    for step in (prompt, decode, mixed):
        torch.testing.assert_close(compiled.execute(step), eager.execute(step), rtol=0, atol=1e-3)
        assert compiled.take_expert_counts() == eager.take_expert_counts()
    assert compiled._split_one_token_rows(mixed) is not None
