"""tool_choice "required" and a named function are enforced by a grammar, as vLLM enforces them:
a random-weight model sampling at temperature 1 (which writes no tool call of its own) answers
with calls to the allowed functions only, their arguments valid against the parameters."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import jsonschema
import pytest

from deployments import chat_completions
from deployments.request_models import ChatCompletionRequest
from deployments.serving import APIError, ServingContext
from engine.async_engine import AsyncLLMEngine
from engine.llm_engine import LLMEngine
from engine.local_executor import LocalExecutor
from engine.tokenizer import Tokenizer

UNIT = {"type": "object", "properties": {"unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["unit"]}
DAY = {"type": "object", "properties": {"day": {"type": "integer", "minimum": 1, "maximum": 7}},
       "required": ["day"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": UNIT}},
         {"type": "function", "function": {"name": "get_forecast", "parameters": DAY}}]
PARAMS = {"get_weather": UNIT, "get_forecast": DAY}


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    from model.tiny import make_tiny_model

    tiny = make_tiny_model(tmp_path_factory.mktemp("enforced"), arch="qwen3_next")
    executor = LocalExecutor(tiny, dtype="float32", num_slots=4, max_model_len=1024)
    engine = AsyncLLMEngine(LLMEngine(executor, tokenizer=Tokenizer(tiny)))
    yield ServingContext(engine=engine, tokenizer=engine.engine.tokenizer, model_name="m", max_model_len=1024,
                         vocab_size=engine.engine.config.vocab_size, reasoning_parser="qwen3",
                         tool_call_parser="hermes")
    engine.shutdown()


def request(**kw: Any) -> ChatCompletionRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "Weather?"}], "tools": TOOLS,
            "temperature": 1.0, "seed": 7, "max_tokens": 120, "n": 4, **kw}
    return ChatCompletionRequest.model_validate(body)


def complete(ctx: ServingContext, req: ChatCompletionRequest) -> dict:
    return json.loads(asyncio.run(chat_completions.complete(ctx, req)).model_dump_json())


def check_calls(choice: dict, names: set[str]) -> list[dict]:
    calls = choice["message"]["tool_calls"] or []
    for call in calls:
        assert call["function"]["name"] in names, call
        jsonschema.validate(json.loads(call["function"]["arguments"]), PARAMS[call["function"]["name"]])
    return calls


def test_named_function_is_called_once_with_valid_arguments(ctx):
    r = complete(ctx, request(tool_choice={"type": "function", "function": {"name": "get_forecast"}}))
    for choice in r["choices"]:
        assert choice["finish_reason"] == "stop", choice
        assert len(check_calls(choice, {"get_forecast"})) == 1 and not choice["message"]["content"]


def test_required_without_parallel_calls_one_allowed_function(ctx):
    r = complete(ctx, request(tool_choice="required", parallel_tool_calls=False))
    for choice in r["choices"]:
        assert choice["finish_reason"] == "tool_calls", choice
        assert len(check_calls(choice, set(PARAMS))) == 1 and not choice["message"]["content"]


def test_required_with_parallel_calls_writes_only_calls(ctx):
    r = complete(ctx, request(tool_choice="required", max_tokens=200))
    for choice in r["choices"]:
        calls = check_calls(choice, set(PARAMS))
        if choice["finish_reason"] == "tool_calls":
            assert calls and not choice["message"]["content"], choice
        else:  # only max_tokens can cut the calls short
            assert choice["finish_reason"] == "length", choice


def test_streamed_named_call(ctx):
    async def run() -> list[dict]:
        req = request(tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True, n=1)
        return [json.loads(line[6:]) async for line in chat_completions.stream(ctx, req)
                if line.startswith("data: {")]

    chunks = asyncio.run(run())
    pieces = [c for chunk in chunks for choice in chunk["choices"]
              for c in choice["delta"].get("tool_calls") or []]
    assert pieces and pieces[0]["function"]["name"] == "get_weather"
    args = "".join(p["function"].get("arguments") or "" for p in pieces)
    jsonschema.validate(json.loads(args), UNIT)


def test_enforced_tool_choice_and_response_format_are_refused_together(ctx):
    with pytest.raises(APIError) as e:
        complete(ctx, request(tool_choice="required", response_format={"type": "json_object"}))
    assert e.value.param == "tool_choice"
