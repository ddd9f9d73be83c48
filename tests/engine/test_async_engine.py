"""AsyncLLMEngine over the fake executor: streams equal the one-at-a-time reference, leaving a
stream early frees the slot, a full queue is refused at once, a step that fails once is retried.
Requests that fail alone: tests/engine/test_isolation.py; the engine thread's death:
tests/engine/test_engine_death.py."""

import asyncio
import itertools
import time

import pytest

from engine.async_engine import AsyncLLMEngine, QueueFullError
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from tests.engine.fakes import FakeExecutor, reference_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)


def make(num_slots=2, queued=2, executor=None):
    executor = executor or FakeExecutor(num_slots=num_slots)
    return AsyncLLMEngine(LLMEngine(executor), max_queued_requests=queued)


async def collect(engine, rid, prompt, params=GREEDY):
    return [t async for o in engine.generate(rid, prompt, params) for t in o.new_token_ids]


async def wait_for(cond, timeout_s=5.0):
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


def test_concurrent_streams_match_reference():
    engine = make(num_slots=2, queued=4)
    prompts = [[3, 4, 5], [7], [9, 9, 2, 8], [11, 12], [6, 6]]

    async def main():
        return await asyncio.gather(*[collect(engine, f"r{i}", p) for i, p in enumerate(prompts)])

    try:
        got = asyncio.run(main())
        assert got == [reference_greedy(p, 5, eos=None) for p in prompts]
        assert engine.stats().num_slots_used == 0
    finally:
        engine.shutdown()


class SlowFakeExecutor(FakeExecutor):
    """A step takes 10 ms, so 50 tokens take longer than an abort needs to arrive, however busy
    the machine is."""

    def execute(self, step):
        time.sleep(0.01)
        return super().execute(step)


def test_leaving_a_stream_aborts_and_frees_the_slot():
    engine = make(executor=SlowFakeExecutor(num_slots=2))
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)

    async def main():
        gen = engine.generate("a", [1, 2, 3], params)
        async for o in gen:
            if o.num_output_tokens >= 2:  # a slow reader may get several tokens at once
                break
        await gen.aclose()
        await wait_for(lambda: engine.stats().num_slots_used == 0 and not engine.engine.has_unfinished())
        return engine.num_in_flight

    try:
        assert asyncio.run(main()) == 0
        assert engine.stats().num_generated_tokens < 50
    finally:
        engine.shutdown()


def test_a_slow_reader_gets_the_waiting_outputs_merged():
    engine = make(num_slots=1)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, logprobs=True, top_logprobs=2)

    async def main():
        outs = []
        async for o in engine.generate("slow", [3, 4], params):
            outs.append(o)
            ahead = o.num_output_tokens + 5  # the engine runs ahead of this reader
            await wait_for(lambda n=ahead: not engine.engine.has_unfinished()
                           or engine.stats().num_generated_tokens >= n)
        return outs

    try:
        outs = asyncio.run(main())
        tokens = [t for o in outs for t in o.new_token_ids]
        assert tokens == reference_greedy([3, 4], 30, eos=None)
        assert len(outs) < len(tokens) and max(len(o.new_token_ids) for o in outs) >= 5
        for o in outs:  # each merged output is whole: a logprob and top-2 per token
            assert len(o.new_logprobs) == len(o.new_top_logprobs) == len(o.new_token_ids)
        counts = [len(o.new_token_ids) for o in outs]
        assert [o.num_output_tokens for o in outs] == list(itertools.accumulate(counts))
        assert outs[-1].finished and outs[-1].finish_reason == "length"
    finally:
        engine.shutdown()


class IdleCountingExecutor(FakeExecutor):
    idle_after_s = 0.05
    idled = 0

    def idle(self):
        self.idled += 1


def test_the_executor_hears_once_per_idle_spell():
    ex = IdleCountingExecutor(num_slots=2)
    engine = make(executor=ex)

    async def main():
        await wait_for(lambda: ex.idled == 1)  # idle from the start
        got = await collect(engine, "a", [5, 6])
        await wait_for(lambda: ex.idled == 2)  # idle again after the request
        await asyncio.sleep(0.3)  # and told once per spell, not every idle_after_s
        return got, ex.idled

    try:
        assert asyncio.run(main()) == (reference_greedy([5, 6], 5, eos=None), 2)
    finally:
        engine.shutdown()


def test_full_queue_is_refused_at_once():
    engine = make(num_slots=1, queued=1)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main():
        tasks = [asyncio.create_task(collect(engine, f"r{i}", [2, 3], params)) for i in range(2)]
        await asyncio.sleep(0)  # both registered
        with pytest.raises(QueueFullError) as e:
            await collect(engine, "r2", [2, 3], params)
        assert e.value.retry_after_s == 1.0
        return await asyncio.gather(*tasks)

    try:
        assert all(len(t) == 40 for t in asyncio.run(main()))
    finally:
        engine.shutdown()


def test_bad_prompt_raises_before_streaming():
    engine = make()

    async def main():
        with pytest.raises(ValueError, match="out of range"):
            await collect(engine, "bad", [10_000])
        return await collect(engine, "good", [4])

    try:
        assert asyncio.run(main()) == reference_greedy([4], 5, eos=None)
    finally:
        engine.shutdown()


class FlakyExecutor(FakeExecutor):
    fail_next = False

    def execute(self, step):
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("boom")
        return super().execute(step)


def test_a_failed_step_is_retried_and_its_requests_go_on():
    ex = FlakyExecutor(num_slots=2)
    engine = make(executor=ex)

    async def main():
        ex.fail_next = True  # once: each of the step's requests is recomputed alone, and passes
        return await asyncio.gather(collect(engine, "a", [5, 6]), collect(engine, "b", [7]))

    try:
        assert asyncio.run(main()) == [reference_greedy(p, 5, eos=None) for p in ([5, 6], [7])]
        assert engine.stats().num_slots_used == 0 and engine.is_alive() and engine.healthy()
    finally:
        engine.shutdown()
