"""Lost executor state (an actor died mid-step) and request time limits, over the fake executor: the
engine recomputes its sequences from prompt + output and produces the undisturbed greedy tokens;
an executor that cannot recover, or keeps failing, ends the requests with an error, never a hang;
a request past its time limit is aborted and frees its slot."""

import asyncio

import pytest

from engine.async_engine import AsyncLLMEngine, EngineStepError, RequestTimeoutError
from engine.executor import ExecutorStateLostError, StepInput
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from tests.engine.fakes import FakeExecutor, reference_greedy

PROMPTS = [[3, 4, 5, 6, 7, 8], [9], [11, 12, 13]]
GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, prompt_logprobs=2)


class FailingExecutor(FakeExecutor):
    """Loses every slot's state at the given step numbers (counted from 0)."""

    def __init__(self, fail_at: set[int], recovered: bool = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.fail_at, self.recovered, self.num_calls = fail_at, recovered, 0

    def execute(self, step: StepInput):
        self.num_calls += 1
        if self.num_calls - 1 in self.fail_at:
            for fed in self.fed.values():
                fed.clear()  # the state died with the actor
            raise ExecutorStateLostError("actor died", recovered=self.recovered)
        return super().execute(step)


@pytest.mark.parametrize("fail_at", [{0}, {1}, {4}, {2, 3, 4}, {1, 6, 11}])
def test_lost_state_is_recomputed_same_greedy_tokens(fail_at):
    # Budget 8 tokens: prompts are prefilled in chunks, so failures hit prefill and decode alike.
    engine = LLMEngine(FailingExecutor(fail_at), max_num_batched_tokens=8)
    undisturbed = LLMEngine(FakeExecutor(), max_num_batched_tokens=8).generate(PROMPTS, GREEDY)
    got = engine.generate(PROMPTS, GREEDY)
    assert [c.token_ids for c in got] == [c.token_ids for c in undisturbed]
    assert [c.token_ids for c in got] == [tuple(reference_greedy(p, 8, eos=None)) for p in PROMPTS]
    assert [c.finish_reason for c in got] == ["length"] * len(PROMPTS)


def test_prompt_logprobs_not_scored_twice():
    # Budget 4: the 6-token prompt is half scored when the second step loses the state.
    engine = LLMEngine(FailingExecutor({1}), max_num_seqs=1, max_num_batched_tokens=4)
    engine.add_request("a", PROMPTS[0], GREEDY)
    first = None
    while engine.has_unfinished():
        for out in engine.step():
            first = first or out
    assert len(first.prompt_logprobs) == len(PROMPTS[0])
    undisturbed = LLMEngine(FakeExecutor(), max_num_seqs=1, max_num_batched_tokens=4)
    undisturbed.add_request("a", PROMPTS[0], GREEDY)
    assert undisturbed.step() == [] and undisturbed.step()[0].prompt_logprobs == first.prompt_logprobs


@pytest.mark.parametrize("recovered,fail_at", [(False, {1}), (True, {1, 2, 3, 4})])
def test_unrecoverable_loss_ends_requests_with_error(recovered, fail_at):
    engine = AsyncLLMEngine(LLMEngine(FailingExecutor(fail_at, recovered=recovered)))

    async def run():
        async for _ in engine.generate("a", [3, 4], GREEDY):
            pass

    try:
        with pytest.raises(EngineStepError, match="actor died"):
            asyncio.run(asyncio.wait_for(run(), 10))
        assert not engine.engine.has_unfinished() and engine.stats().num_slots_used == 0
        assert engine.is_alive()

        async def again():  # the executor is back: the next request runs normally
            return [t async for o in engine.generate("b", [3, 4], GREEDY) for t in o.new_token_ids]

        assert asyncio.run(asyncio.wait_for(again(), 10)) == reference_greedy([3, 4], 8, eos=None)
    finally:
        engine.shutdown()


class SlowExecutor(FakeExecutor):
    def execute(self, step: StepInput):
        import time

        time.sleep(0.05)
        return super().execute(step)


def test_request_timeout_aborts_and_frees_the_slot():
    engine = AsyncLLMEngine(LLMEngine(SlowExecutor()), request_timeout_s=0.3)
    params = SamplingParams(temperature=0, max_tokens=1000, ignore_eos=True)

    async def run():
        n = 0
        with pytest.raises(RequestTimeoutError, match=r"0\.3s"):
            async for o in engine.generate("a", [3, 4], params):
                n += len(o.new_token_ids)
        for _ in range(100):
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.01)
        return n

    try:
        n = asyncio.run(run())
        assert 0 < n < 1000
        assert not engine.engine.has_unfinished() and engine.stats().num_slots_used == 0
    finally:
        engine.shutdown()
