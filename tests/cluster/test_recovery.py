"""Actor failures in the middle of streaming greedy generations: an expert shard, then a DeltaNet
actor, then the attention actor is killed while requests stream; the executor restarts its actors,
the engine recomputes the sequences from their tokens, and every request ends with the tokens of
an undisturbed run. Prints the time to recover.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest tests/cluster/test_recovery.py -s'"""

from __future__ import annotations

import asyncio
import time

import pytest

ray = pytest.importorskip("ray")

from cluster.executor import ClusterExecutor  # noqa: E402
from deployments.config import NextserveConfig  # noqa: E402
from engine.async_engine import AsyncLLMEngine  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from tests.ray_fixtures import ray_session_fixture  # noqa: E402

PROMPTS = [[5, 17, 33, 2, 90], [7, 7, 120], [250, 3, 4, 5, 6, 7, 8, 9], [42]]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=True)
KILL_AFTER = 8  # tokens the first stream has seen when the actor is killed


ray_session = ray_session_fixture(num_cpus=8, autouse=False)


@pytest.fixture(scope="module")
def executor(ray_session, hf_next_dir):
    ex = ClusterExecutor(hf_next_dir, dtype="float32", num_slots=4, max_model_len=64,
                         config=NextserveConfig.from_args({"cluster": {"step_timeout_s": 10}}))
    yield ex
    ex.shutdown()


@pytest.fixture(scope="module")
def reference(executor):
    """The undisturbed run, on the same actors."""
    return [c.token_ids for c in LLMEngine(executor).generate(PROMPTS, GREEDY)]


def actor(executor: ClusterExecutor, name: str):
    return dict(zip(executor.actor_names(), executor.actors.actors, strict=True))[name]


async def stream_with_kill(engine: AsyncLLMEngine, victim) -> tuple[list[list[int]], float]:
    """Stream every prompt at once; kill `victim` once the first stream has KILL_AFTER tokens.
    Returns the tokens and the seconds from the kill to the next token of any stream."""
    killed_at: list[float] = []
    resumed_at: list[float] = []

    async def one(i: int, prompt: list[int]) -> list[int]:
        tokens: list[int] = []
        async for out in engine.generate(f"r{i}", prompt, GREEDY):
            if i == 0 and killed_at and not resumed_at:  # the victim's next token: a step ran
                resumed_at.append(time.monotonic())
            tokens += out.new_token_ids
            if i == 0 and len(tokens) == KILL_AFTER:
                ray.kill(victim, no_restart=True)
                killed_at.append(time.monotonic())
        return tokens

    got = await asyncio.wait_for(asyncio.gather(*[one(i, p) for i, p in enumerate(PROMPTS)]), 120)
    assert killed_at and resumed_at, "the kill came after every stream had finished"
    return list(got), resumed_at[0] - killed_at[0]


@pytest.mark.parametrize("name", ["experts-1", "deltanet-0", "attention-0"])
def test_actor_killed_mid_stream_same_greedy_tokens(executor, reference, name):
    assert all(len(t) == GREEDY.max_tokens for t in reference)
    victim = actor(executor, name)
    before = executor.num_recoveries
    engine = AsyncLLMEngine(LLMEngine(executor))
    try:
        got, gap = asyncio.run(stream_with_kill(engine, victim))
    finally:
        engine._stopped = True  # stop the engine thread, keep the executor for the next case
        engine._wakeup.set()
        engine._thread.join(10)
    assert executor.num_recoveries == before + 1
    assert victim not in executor.actors.actors
    print(f"\n[recovery] killed {name}: actors restarted and graph recompiled in "
          f"{executor.last_recovery_s:.2f}s; streams resumed {gap:.2f}s after the kill\n"
          f"           restarted {executor.last_recovery_detail}")
    assert [tuple(t) for t in got] == reference
