"""The engine core in its own process (engine/core.py) behind EngineCoreClient: streams equal
the one-at-a-time reference, one message per step, refusals and start-up errors arrive as the
same exceptions as in-process, shutdown leaves no process behind, and a core killed by PID ends
every stream with EngineDeadError, refuses new requests at once and turns healthy() False. So
does a replica killed under its core: the core exits. Over the fake executor."""

from __future__ import annotations

import asyncio
import functools
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from engine.async_engine import EngineDeadError, QueueFullError
from engine.config import NextserveConfigError
from engine.core_client import EngineCoreClient
from engine.sampling import SamplingParams
from tests.engine.fakes import build_fake_engine, reference_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
LONG = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)


def gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def wait_gone(pid: int, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.05)
    return False


async def collect(engine, rid, prompt, params=GREEDY):
    return [t async for o in engine.generate(rid, prompt, params) for t in o.new_token_ids]


@pytest.fixture(scope="module")
def client():
    engine = EngineCoreClient(functools.partial(build_fake_engine, num_slots=2), max_queued_requests=4)
    yield engine
    engine.shutdown()


def test_streams_match_reference_with_one_message_per_step(client):
    prompts = [[3, 4, 5], [7], [9, 9, 2, 8], [11, 12], [6, 6]]
    steps: list[int] = []
    client.step_hooks.append(lambda stats, seconds, counts: steps.append(stats.num_steps))

    async def main():
        return await asyncio.gather(*(collect(client, f"r{i}", p) for i, p in enumerate(prompts)))

    try:
        got = asyncio.run(main())
    finally:
        client.step_hooks.clear()
    assert got == [reference_greedy(p, 5) for p in prompts]
    assert steps == list(range(steps[0], steps[0] + len(steps)))  # every step heard, once
    assert client.stats().num_generated_tokens >= 25
    assert client.num_in_flight == 0 and client.healthy()


def test_a_refused_prompt_and_a_full_queue_raise_as_in_process(client):
    async def main():
        with pytest.raises(ValueError, match="token id 99 is out of range for vocab_size 32"):
            await collect(client, "bad", [99])
        with pytest.raises(ValueError, match="already in use"):
            async with asyncio.timeout(10):
                streams = [client.generate("dup", [3], LONG), client.generate("dup", [3], LONG)]
                await anext(streams[0])
                try:
                    await anext(streams[1])
                finally:
                    await streams[0].aclose()
        long = [asyncio.create_task(collect(client, f"l{i}", [5], LONG)) for i in range(client.capacity)]
        await asyncio.sleep(0)  # each has registered its stream: the queue is full
        assert client.num_in_flight == client.capacity
        with pytest.raises(QueueFullError):
            await collect(client, "one-too-many", [5])
        for t in long:
            t.cancel()
        await asyncio.gather(*long, return_exceptions=True)

    asyncio.run(main())
    for _ in range(100):  # the cancelled streams' aborts free their slots, and stats() says so
        if client.stats().num_slots_used == 0:
            break
        time.sleep(0.05)
    assert client.stats().num_slots_used == 0 and client.stats().num_running == 0
    assert asyncio.run(collect(client, "after", [3, 4, 5])) == reference_greedy([3, 4, 5], 5)


def test_an_idle_core_reports_buckets_compiled_in_the_background():
    """engine.compile's buckets become ready while no request steps the core: its stats (the
    replica's /stats) follow anyway, and requests are served meanwhile."""
    engine = EngineCoreClient(functools.partial(build_fake_engine, num_slots=2, compile_s=0.5))
    try:
        assert engine.stats().compiling and engine.stats().compiled_buckets == ()
        assert asyncio.run(collect(engine, "r", [3, 4, 5])) == reference_greedy([3, 4, 5], 5)
        deadline = time.monotonic() + 30
        while engine.stats().compiling and time.monotonic() < deadline:
            time.sleep(0.1)
        assert engine.stats().compiled_buckets == (1, 2, 4) and not engine.stats().compiling
    finally:
        engine.shutdown()


def test_a_startup_error_reaches_the_caller_with_its_type_and_text():
    with pytest.raises(NextserveConfigError, match=r"^model: no such checkpoint$"):
        EngineCoreClient(functools.partial(build_fake_engine, fail="model: no such checkpoint"))


def test_shutdown_ends_the_core_process():
    engine = EngineCoreClient(functools.partial(build_fake_engine))
    pid = engine.pid
    assert asyncio.run(collect(engine, "a", [3])) == reference_greedy([3], 5)
    engine.shutdown()
    assert wait_gone(pid) and not engine.is_alive() and not engine.healthy()


def test_a_killed_core_ends_streams_with_503_and_refuses_new_requests():
    engine = EngineCoreClient(functools.partial(build_fake_engine, step_s=0.02,
                                                max_model_len=20_000), max_queued_requests=2)
    forever = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)

    async def stream(rid, started):
        async for _ in engine.generate(rid, [3, 4], forever):
            started.set()

    async def main():
        started = [asyncio.Event(), asyncio.Event()]
        tasks = [asyncio.create_task(stream(f"s{i}", e)) for i, e in enumerate(started)]
        for e in started:
            await asyncio.wait_for(e.wait(), 30)
        assert engine.healthy()
        os.kill(engine.pid, signal.SIGKILL)
        for t in tasks:
            with pytest.raises(EngineDeadError, match="engine core process exited"):
                await asyncio.wait_for(t, 10)
        with pytest.raises(EngineDeadError):
            await asyncio.wait_for(collect(engine, "new", [3]), 1)

    try:
        asyncio.run(main())
        assert not engine.healthy() and not engine.is_alive() and engine.num_in_flight == 0
    finally:
        engine.shutdown()


def test_a_core_outlives_no_replica(tmp_path):
    """The replica's process dies without a word (SIGKILL): its core sees the pipe close and exits."""
    script = textwrap.dedent("""
        import functools, os, sys
        from engine.core_client import EngineCoreClient
        from tests.engine.fakes import build_fake_engine
        if __name__ == "__main__":
            engine = EngineCoreClient(functools.partial(build_fake_engine))
            print(engine.pid, flush=True)
            os.kill(os.getpid(), 9)
    """)
    path = tmp_path / "replica.py"
    path.write_text(script)
    out = subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    pid = int(out.stdout.split()[0])
    assert wait_gone(pid, 15), f"the core {pid} outlived its replica"


def test_an_idle_core_takes_a_burst_into_one_first_step():
    """Requests that reach an idle core a little apart (within BURST_GAP_S of each other) are
    prefilled together in its first step, not the first alone while the rest wait behind it;
    one that comes after the window waits for the next step."""
    from multiprocessing import Pipe

    from engine.core import BURST_GAP_S, AddRequest, CoreStep, EngineCore, Shutdown

    ours, theirs = Pipe()
    core = EngineCore(build_fake_engine(num_slots=4), theirs)
    ours.recv()  # CoreReady
    thread = threading.Thread(target=core.run, daemon=True)
    thread.start()
    for rid in ("a", "b", "c"):
        ours.send(AddRequest(rid, [3, 4, 5], GREEDY))
        time.sleep(BURST_GAP_S / 4)
    first = ours.recv()
    time.sleep(0.2)  # the burst window is long over
    ours.send(AddRequest("d", [7], GREEDY))
    later = []
    while ours.poll(10) and not any(m.accepted for m in later):
        later.append(ours.recv())
    ours.send(Shutdown())
    thread.join(timeout=10)
    assert isinstance(first, CoreStep) and first.accepted == ("a", "b", "c")
    assert sorted(row[0] for row in first.outputs) == ["a", "b", "c"]  # one step, three first tokens
    assert not thread.is_alive()
    assert [m.accepted for m in later if m.accepted] == [("d",)]
