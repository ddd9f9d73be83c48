"""No request can fail another: a request whose data breaks the executor's step, the sampler or
the processing of its output fails alone with its error, and the requests beside it produce
exactly the outputs of a run without it, through LLMEngine and AsyncLLMEngine. Over the fake
executor, and once over the real Qwen3-Next, whose DeltaNet state a failed step leaves corrupt."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncLLMEngine, EngineStepError, RequestFailedError
from engine.executor import StepInput
from engine.llm_engine import LLMEngine
from engine.sampling import Sampler, SamplingParams
from tests.engine.fakes import FakeExecutor, reference_greedy

POISON = 31  # a prompt token the poisoned executor cannot take
GOOD = [[3, 4, 5, 6, 7, 8], [9], [11, 12, 13]]
BAD = [2, 3, 4, 5, 6, POISON, 7, 8, 9, 10]  # the poison in the second chunk of 4
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True, top_logprobs=2,
                        prompt_logprobs=1)


class PoisonedExecutor(FakeExecutor):
    """Fails every step that feeds it POISON, after scribbling on the caches of the step's slots,
    as a model that fails half-way through its layers leaves them."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.failed_steps: list[StepInput] = []
        self.engine_errors: list[AssertionError] = []  # the engine fed a slot out of order

    def execute(self, step: StepInput):
        if POISON in step.token_ids:
            for slot in step.slots:
                self.fed[slot].append(-1)
            self.failed_steps.append(step)
            raise RuntimeError("poisoned")
        try:
            return super().execute(step)
        except AssertionError as e:
            self.engine_errors.append(e)
            raise


def outputs_by_request(engine: LLMEngine, requests: dict[str, tuple[list[int], SamplingParams]],
                       ) -> dict[str, list]:
    for rid, (prompt, params) in requests.items():
        engine.add_request(rid, prompt, params)
    got: dict[str, list] = {}
    for _ in range(1000):
        if not engine.has_unfinished():
            return got
        for o in engine.step():
            got.setdefault(o.request_id, []).append(o)
    raise AssertionError("the engine did not finish")


def test_reference_tokens_never_hold_the_poison():  # what the tests below rely on
    assert all(POISON not in reference_greedy(p, 8, eos=None) for p in GOOD)


@pytest.mark.parametrize("budget", [4, 64])  # the poison in a later prefill chunk / in the first step
def test_a_request_that_breaks_the_executor_fails_alone(budget):
    good = {f"g{i}": (p, GREEDY) for i, p in enumerate(GOOD)}
    undisturbed = outputs_by_request(LLMEngine(FakeExecutor(), max_num_batched_tokens=budget), good)
    ex = PoisonedExecutor()
    engine = LLMEngine(ex, max_num_batched_tokens=budget)
    got = outputs_by_request(engine, {"g0": good["g0"], "bad": (BAD, GREEDY), "g1": good["g1"],
                                      "g2": good["g2"]})
    for rid in good:  # the same outputs, logprobs and prompt logprobs included
        assert got[rid] == undisturbed[rid]
        assert [t for o in got[rid] for t in o.new_token_ids] == reference_greedy(good[rid][0], 8, eos=None)
    (failed,) = got["bad"]
    assert failed.finished and failed.finish_reason == "error" and failed.new_token_ids == ()
    assert failed.error == "the model step failed: RuntimeError: poisoned"
    # One shared step failed, then the bad request's own step: no other retry, nothing fed wrong.
    assert [len(s.slots) for s in ex.failed_steps] == [len(ex.failed_steps[0].slots), 1]
    assert len(ex.failed_steps[0].slots) > 1 and not ex.engine_errors
    st = engine.stats
    assert (st.num_finished, st.num_slots_used, st.num_running, st.num_waiting) == (3, 0, 0, 0)
    # The engine goes on serving.
    assert engine.generate([GOOD[1]], GREEDY)[0].token_ids == tuple(reference_greedy(GOOD[1], 8, eos=None))


def test_an_executor_that_fails_every_step_fails_each_request_once():
    class BrokenExecutor(FakeExecutor):
        calls = 0

        def execute(self, step):
            self.calls += 1
            raise RuntimeError("broken")

    ex = BrokenExecutor()
    results = LLMEngine(ex).generate(GOOD, GREEDY)
    assert [r.finish_reason for r in results] == ["error"] * 3
    assert all(r.token_ids == () and "RuntimeError: broken" in r.error for r in results)
    assert ex.calls == 1 + len(GOOD)  # the shared step, then one step of each request alone


class PickySampler(Sampler):
    """Refuses a batch holding a row with top_k == 13, after drawing (so the seeded rows' draws
    were spent); a row of its own fails only if it is that row."""

    def __call__(self, logits, params, generators=None, histories=None):
        out = super().__call__(logits, params, generators, histories)
        if any(p.top_k == 13 for p in params):
            raise ValueError("top_k 13 is unlucky")
        return out


def test_a_request_that_breaks_the_sampler_fails_alone():
    seeded = SamplingParams(temperature=1.0, seed=7, max_tokens=8, ignore_eos=True, logprobs=True)
    sampled = SamplingParams(temperature=0.7, top_p=0.9, seed=11, max_tokens=8, ignore_eos=True)
    good = {"greedy": (GOOD[0], GREEDY), "seeded": (GOOD[1], seeded), "sampled": (GOOD[2], sampled)}
    engine = LLMEngine(FakeExecutor())
    engine.sampler = PickySampler()
    undisturbed = outputs_by_request(engine, good)
    bad = SamplingParams(temperature=1.0, top_k=13, seed=1, max_tokens=8, ignore_eos=True)
    got = outputs_by_request(engine, {"bad": ([4, 5], bad), **good})
    for rid in good:
        assert got[rid] == undisturbed[rid]
    (failed,) = got["bad"]
    assert failed.finish_reason == "error"
    assert failed.error == "sampling failed: ValueError: top_k 13 is unlucky"


def test_a_huge_top_k_means_all_tokens_and_harms_nobody():
    huge = SamplingParams(temperature=1.0, top_k=9223372036854775808, seed=5, max_tokens=8, ignore_eos=True)
    every = SamplingParams(temperature=1.0, top_k=0, seed=5, max_tokens=8, ignore_eos=True)
    engine = LLMEngine(FakeExecutor())
    with_huge = engine.generate([GOOD[0], GOOD[1]], [GREEDY, huge])
    with_all = engine.generate([GOOD[0], GOOD[1]], [GREEDY, every])
    assert [r.finish_reason for r in with_huge] == ["length", "length"]
    assert with_huge[1].token_ids == with_all[1].token_ids
    assert with_huge[0].token_ids == tuple(reference_greedy(GOOD[0], 8, eos=None))


def test_through_the_async_engine_only_the_bad_stream_fails():
    ex = PoisonedExecutor()
    engine = AsyncLLMEngine(LLMEngine(ex, max_num_batched_tokens=4))
    huge = SamplingParams(temperature=1.0, top_k=2**63, max_tokens=8, ignore_eos=True)

    async def tokens(rid, prompt, params=GREEDY):
        return [t async for o in engine.generate(rid, prompt, params) for t in o.new_token_ids]

    async def main():
        runs = [tokens(f"g{i}", p) for i, p in enumerate(GOOD)]
        return await asyncio.wait_for(asyncio.gather(tokens("bad", BAD), tokens("huge", [5, 6], huge), *runs,
                                                     return_exceptions=True), 60)

    try:
        bad, huge_tokens, *good = asyncio.run(main())
        assert good == [reference_greedy(p, 8, eos=None) for p in GOOD]
        assert isinstance(bad, RequestFailedError) and not isinstance(bad, EngineStepError)
        assert bad.request_id == "bad"
        assert str(bad) == "request bad failed: the model step failed: RuntimeError: poisoned"
        assert len(huge_tokens) == 8
        assert engine.is_alive() and engine.healthy() and engine.stats().num_slots_used == 0
        again = asyncio.run(asyncio.wait_for(tokens("again", GOOD[0]), 60))  # bounds a hang, not speed
        assert again == reference_greedy(GOOD[0], 8, eos=None)
    finally:
        engine.shutdown()


def test_over_the_local_executor_the_corrupted_deltanet_state_is_recomputed(tmp_path):
    """The real Qwen3-Next with a fault in its last layer: the DeltaNet layers before it have
    already updated every slot of the step in place when it raises. The other requests' greedy
    tokens must still equal an undisturbed run's."""
    from engine.local_executor import LocalExecutor
    from model.tiny import make_tiny_model

    model_dir = make_tiny_model(tmp_path, arch="qwen3_next")
    poison = 250
    prompts = [[5, 9, 13, 2, 77, 31, 8], [101], [44, 12, 90, 6, 6, 200, 7, 7, 19, 60, 2]]
    bad = [3, 3, 3, poison, 17]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    def make() -> LLMEngine:
        return LLMEngine(LocalExecutor(model_dir=model_dir, num_slots=4, max_model_len=64),
                         max_num_batched_tokens=8)

    undisturbed = make().generate(prompts, params)
    assert all(poison not in r.token_ids for r in undisturbed)
    engine = make()
    executor = engine.executor
    execute, fed_poison = executor.execute, []

    def poisoned_execute(step):
        fed_poison.append(poison in step.token_ids)
        return execute(step)

    def last_layer_fault(module, args):
        if fed_poison[-1]:
            raise RuntimeError("fault in the last layer")

    executor.execute = poisoned_execute
    layers = executor.model.model.layers
    assert [layer.kind for layer in layers[:-1]] == ["linear_attention"] * (len(layers) - 1)
    layers[-1].register_forward_pre_hook(last_layer_fault)
    got = engine.generate([prompts[0], bad, prompts[1], prompts[2]], params)
    assert [r.token_ids for r in got[:1] + got[2:]] == [r.token_ids for r in undisturbed]
    assert got[1].finish_reason == "error" and "fault in the last layer" in got[1].error
    assert sum(fed_poison) == 2  # the shared step, then the bad request's own


def test_an_unhealthy_executor_fails_the_step_not_a_request():
    class DownExecutor(FakeExecutor):
        def healthy(self) -> bool:
            return False

        def execute(self, step):
            raise RuntimeError("the executor is down")

    engine = LLMEngine(DownExecutor())
    engine.add_request("a", GOOD[0], GREEDY)
    with pytest.raises(RuntimeError, match="the executor is down"):  # the server ends every request
        engine.step()
    assert not engine.scheduler.isolated


def test_a_request_whose_output_cannot_be_processed_fails_alone():
    class BrokenDetokenizer:
        def add(self, token_id: int) -> bool:
            raise ValueError(f"cannot decode {token_id}")

    undisturbed = outputs_by_request(LLMEngine(FakeExecutor()), {"g": (GOOD[0], GREEDY)})
    engine = LLMEngine(FakeExecutor())
    engine.add_request("bad", GOOD[1], GREEDY)
    engine._requests["bad"].detokenizer = BrokenDetokenizer()
    got = outputs_by_request(engine, {"g": (GOOD[0], GREEDY)})
    assert got["g"] == undisturbed["g"]
    (failed,) = got["bad"]
    assert failed.finish_reason == "error"
    assert failed.error.startswith("processing the output failed: ValueError: cannot decode")
    assert engine.stats.num_slots_used == 0
