"""The engine thread's death: once anything escapes its loop, streams in flight end with
EngineDeadError (a 503 to the server, as every EngineStepError), new requests get it at once,
healthy() is False; nothing hangs. Over the fake executor."""

from __future__ import annotations

import asyncio

import pytest

from engine.async_engine import AsyncLLMEngine, EngineDeadError, EngineStepError
from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from tests.engine.fakes import FakeExecutor, reference_greedy

LONG = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
SHORT = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


class Fatal(BaseException):
    """Not an Exception: nothing in the loop may catch it on the way out."""


class LongExecutor(FakeExecutor):
    def __init__(self) -> None:
        super().__init__(num_slots=2, max_model_len=20_000)


async def wait_for(cond, timeout_s: float = 5.0) -> None:
    for _ in range(int(timeout_s / 0.01)):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("condition not reached")


async def collect(engine: AsyncLLMEngine, rid: str, prompt: list[int]) -> list[int]:
    return [t async for o in engine.generate(rid, prompt, SHORT) for t in o.new_token_ids]


async def first_output_then_rest(engine: AsyncLLMEngine, rid: str, started: asyncio.Event) -> int:
    n = 0
    async for o in engine.generate(rid, [3, 4], LONG):
        n += len(o.new_token_ids)
        started.set()
    return n


def test_a_dead_engine_thread_ends_streams_and_refuses_new_requests():
    engine = AsyncLLMEngine(LLMEngine(LongExecutor()))
    step = engine.engine.step

    def fatal_step():
        if engine.engine.stats.num_generated_tokens >= 3:
            raise Fatal("the loop broke")
        return step()

    async def main():
        assert engine.healthy()
        engine.engine.step = fatal_step
        started = asyncio.Event()
        in_flight = asyncio.create_task(first_output_then_rest(engine, "a", started))
        await asyncio.wait_for(started.wait(), 5)
        with pytest.raises(EngineDeadError, match="the engine stopped: Fatal: the loop broke"):
            await asyncio.wait_for(in_flight, 5)
        await wait_for(lambda: not engine.is_alive())
        with pytest.raises(EngineDeadError, match="the loop broke"):  # at once: nothing waits
            await asyncio.wait_for(engine.generate("b", [3], SHORT).__anext__(), 0.5)

    try:
        asyncio.run(main())
        assert not engine.healthy() and not engine.is_alive() and engine.num_in_flight == 0
        assert issubclass(EngineDeadError, EngineStepError)  # the server answers 503
    finally:
        engine.shutdown(timeout_s=1)


def test_a_death_while_taking_a_request_ends_that_request_too():
    engine = AsyncLLMEngine(LLMEngine(FakeExecutor()))

    def fatal_add(*args, **kwargs):
        raise Fatal("cannot add")

    async def main():
        assert await collect(engine, "ok", [5]) == reference_greedy([5], 4, eos=None)
        engine.engine.add_request = fatal_add
        with pytest.raises(EngineDeadError, match="cannot add"):
            await asyncio.wait_for(collect(engine, "b", [6]), 5)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(collect(engine, "c", [6]), 0.5)

    try:
        asyncio.run(main())
        assert not engine.healthy()
    finally:
        engine.shutdown(timeout_s=1)


def test_healthy_follows_the_executor_and_shutdown():
    class SickExecutor(FakeExecutor):
        well = True

        def healthy(self) -> bool:
            return self.well

    ex = SickExecutor()
    engine = AsyncLLMEngine(LLMEngine(ex))
    try:
        assert engine.healthy()
        ex.well = False
        assert not engine.healthy() and engine.is_alive()
        ex.well = True
        assert engine.healthy()
    finally:
        engine.shutdown(timeout_s=1)
    assert not engine.healthy()
