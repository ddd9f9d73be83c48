"""The serving layer in-process, without Ray: tokenizing off the event loop, the health rule, the
keys and the rebalance cool-down, and that a client leaving a stream aborts its request at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from deployments import completions
from deployments.config import NextserveConfig
from deployments.request_models import CompletionRequest
from deployments.security import (
    RebalanceGate,
    SecuritySettings,
    bearer_matches,
    keys_from_environment,
    max_prompts_per_request,
)
from deployments.server import engine_healthy
from deployments.serving import ServingContext
from engine.config import NextserveConfigError
from engine.llm_engine import RequestOutput


class SlowTokenizer:
    """Tokenizing holds the thread for a while, as a long prompt does."""

    vocab_size = 100
    max_token_chars = 8

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        time.sleep(0.6)
        return [1, 2, 3]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "x" * len(ids)


class CountingEngine:
    """Yields `n` tokens, one per 10 ms; records which requests are still running."""

    def __init__(self, n: int = 3) -> None:
        self.n, self.running = n, set()

    async def generate(self, request_id: str, prompt: Any, params: Any) -> AsyncIterator[RequestOutput]:
        self.running.add(request_id)
        try:
            for i in range(self.n):
                await asyncio.sleep(0.01)
                last = i == self.n - 1
                yield RequestOutput(request_id, (7,), None, last, "length" if last else None, len(prompt),
                                    i + 1, new_text="x")
        finally:  # an AsyncLLMEngine sends the abort here
            self.running.discard(request_id)


def context(engine: Any, tokenizer: Any = None) -> ServingContext:
    return ServingContext(engine=engine, tokenizer=tokenizer or SlowTokenizer(), model_name="m",
                          max_model_len=64, vocab_size=100, max_prompts=4)


def test_tokenizing_does_not_stall_the_event_loop():
    async def main() -> float:
        gaps, stop = [], asyncio.Event()

        async def ticker() -> None:
            last = time.monotonic()
            while not stop.is_set():
                await asyncio.sleep(0.01)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        tick = asyncio.create_task(ticker())
        req = CompletionRequest(model="m", prompt=["a long prompt", "another"], max_tokens=3)
        out = await completions.complete(context(CountingEngine()), req)
        stop.set()
        await tick
        assert [c.text for c in out.choices] == ["xxx", "xxx"]
        return max(gaps)

    assert asyncio.run(main()) < 0.3  # tokenizing took 1.2 s, in a worker thread


def test_a_stream_left_early_ends_its_requests_at_once():
    """Closing the route's stream closes every generator under it (no waiting for the garbage
    collector), so the engine aborts the requests and frees their slots before anything else."""
    async def main() -> None:
        engine = CountingEngine(n=1000)
        ctx = context(engine)
        for prompts in (["one"], ["one", "two", "three"]):
            req = CompletionRequest(model="m", prompt=prompts, max_tokens=50, stream=True)
            events = completions.stream(ctx, req)
            await anext(events)
            assert len(engine.running) == len(prompts)
            await events.aclose()
            assert engine.running == set()

    asyncio.run(main())


class Fake:
    def __init__(self, **methods: Any) -> None:
        for name, value in methods.items():
            setattr(self, name, lambda v=value: v)


def test_health_follows_the_engine():
    assert engine_healthy(Fake(healthy=True, is_alive=True))
    assert not engine_healthy(Fake(healthy=False, is_alive=True))  # e.g. the executor lost its actors
    assert not engine_healthy(Fake(is_alive=False))  # an engine without healthy(): its thread
    assert engine_healthy(Fake())


def scope(authorization: str | None) -> dict[str, Any]:
    headers = [(b"authorization", authorization.encode())] if authorization is not None else []
    return {"type": "http", "path": "/rebalance", "headers": headers}


def test_bearer_keys():
    assert bearer_matches(scope("Bearer k1"), "k1") and bearer_matches(scope("bearer  k1"), "k1")
    for bad in (None, "k1", "Bearer k2", "Bearer k1x", "Basic k1", "Bearer "):
        assert not bearer_matches(scope(bad), "k1"), bad


def test_keys_from_config_or_environment(monkeypatch):
    monkeypatch.setenv("NEXTSERVE_API_KEY", "env-key")
    monkeypatch.delenv("NEXTSERVE_ADMIN_API_KEY", raising=False)
    s = SecuritySettings.from_config(NextserveConfig.from_args({}))
    assert (s.api_key, s.admin_api_key) == ("env-key", None)
    s = SecuritySettings.from_config(NextserveConfig.from_args({"serve": {"api_key": "cfg"}}))
    assert s.api_key == "cfg" and "cfg" not in repr(s) and "cfg" not in repr(NextserveConfig.from_args(
        {"serve": {"api_key": "cfg"}}))
    assert keys_from_environment({"model": "m"}) == {"model": "m", "serve": {"api_key": "env-key"}}


def test_rebalance_gate():
    now = [100.0]
    gate = RebalanceGate(cooldown_s=30, clock=lambda: now[0])
    app = type("App", (), {"state": type("State", (), {})()})()
    app.state.security = SecuritySettings()
    assert gate.check({**scope("Bearer a"), "app": app})[0] == 403  # no admin key: off
    app.state.security = SecuritySettings(admin_api_key="a")
    assert gate.check({**scope("Bearer b"), "app": app})[0] == 401
    assert gate.check({**scope("Bearer a"), "app": app}) is None
    now[0] += 10
    status, _, retry_after = gate.check({**scope("Bearer a"), "app": app})
    assert status == 429 and retry_after == pytest.approx(20)
    now[0] += 21
    assert gate.check({**scope("Bearer a"), "app": app}) is None


def test_prompt_limit_default_and_ceiling():
    config = NextserveConfig.from_args({"engine": {"max_num_seqs": 4}, "serve": {"max_queued_requests": 8}})
    assert max_prompts_per_request(config) == 12
    ok = NextserveConfig.from_args({"engine": {"max_num_seqs": 4},
                                    "serve": {"max_queued_requests": 8, "max_prompts_per_request": 5}})
    assert max_prompts_per_request(ok) == 5
    too_many = {"engine": {"max_num_seqs": 4},
                "serve": {"max_queued_requests": 8, "max_prompts_per_request": 13}}
    with pytest.raises(NextserveConfigError, match="max_prompts_per_request"):
        max_prompts_per_request(NextserveConfig.from_args(too_many))


def test_choice_seeds_follow_vllm_and_stay_in_64_bits():
    from deployments.serving import choice_seed
    from engine.sampling import SamplingParams

    assert [choice_seed(7, j) for j in range(3)] == [7, 8, 9] and choice_seed(None, 2) is None
    assert choice_seed(2**64 - 1, 1) == 0 and choice_seed(2**64 - 2, 3) == 1  # seeds are mod 2**64
    assert SamplingParams(seed=choice_seed(2**64 - 1, 5)).make_generator("cpu") is not None
