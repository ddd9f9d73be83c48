"""Tool calls and reasoning in the chat route, without Ray: requests through the route's
functions to the real engine (AsyncLLMEngine, scheduler, detokenizer) over a scripted model
that writes what a Qwen3 model writes (tests/deployments/scripted_model.py), streamed and not;
the prompt the tiny checkpoint's template renders for tools and tool turns, against
transformers' apply_chat_template; and the 400s for tool fields that cannot work."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from deployments import chat_completions
from deployments.request_models import ChatCompletionRequest
from deployments.serving import APIError, ServingContext
from engine.async_engine import AsyncLLMEngine
from engine.llm_engine import LLMEngine
from tests.deployments.scripted_model import ScriptedExecutor

UNIT = {"type": "string", "enum": ["celsius", "fahrenheit"]}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": UNIT},
                   "required": ["city"]}}}
TIME = {"type": "function",
        "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tools"), arch="qwen3_next")


@pytest.fixture(scope="module")
def engine(tiny_dir):
    executor = ScriptedExecutor(tiny_dir, num_slots=2, max_model_len=1024)
    engine = AsyncLLMEngine(LLMEngine(executor, tokenizer=executor.tokenizer))
    yield engine
    engine.shutdown()


def context(engine: AsyncLLMEngine, **kw: Any) -> ServingContext:
    kw = {"reasoning_parser": "qwen3", "tool_call_parser": "hermes", **kw}
    return ServingContext(engine=engine, tokenizer=engine.engine.tokenizer, model_name="m",
                          max_model_len=1024, vocab_size=engine.engine.config.vocab_size, **kw)


def request(script: str, **kw: Any) -> ChatCompletionRequest:
    messages = kw.pop("messages", [{"role": "user", "content": f"[[{script}]] Weather in Paris?"}])
    return ChatCompletionRequest.model_validate({"model": "m", "messages": messages, "temperature": 0, **kw})


def complete(ctx: ServingContext, req: ChatCompletionRequest) -> dict:
    return json.loads(asyncio.run(chat_completions.complete(ctx, req)).model_dump_json())


def stream(ctx: ServingContext, req: ChatCompletionRequest) -> list[dict]:
    async def run() -> list[str]:
        return [e async for e in chat_completions.stream(ctx, req)]

    events = asyncio.run(run())
    assert events[-1] == "data: [DONE]\n\n"
    return [json.loads(e.removeprefix("data: ")) for e in events[:-1]]


def assemble(chunks: list[dict]) -> dict:
    """A streamed answer put together the way OpenAI's docs tell clients to."""
    message: dict[str, Any] = {"content": "", "reasoning_content": "", "tool_calls": []}
    finish = None
    for c in chunks:
        for choice in c["choices"]:
            d = choice["delta"]
            message["content"] += d.get("content") or ""
            message["reasoning_content"] += d.get("reasoning_content") or ""
            assert d.get("reasoning") == d.get("reasoning_content")
            for t in d.get("tool_calls") or ():
                if t["index"] == len(message["tool_calls"]):  # a new call: id, type and name come first
                    assert t["id"].startswith("call_") and t["type"] == "function" and t["function"]["name"]
                    message["tool_calls"].append({"id": t["id"], "type": "function",
                                                  "function": dict(t["function"])})
                else:
                    assert set(t) == {"index", "function"} and set(t["function"]) == {"arguments"}
                    message["tool_calls"][t["index"]]["function"]["arguments"] += t["function"]["arguments"]
            finish = choice["finish_reason"] or finish
    return {"message": message, "finish_reason": finish}


def test_tool_call_with_reasoning_whole_and_streamed(engine):
    ctx = context(engine)
    r = complete(ctx, request("weather", tools=[WEATHER, TIME]))
    (choice,) = r["choices"]
    m = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert m["content"] is None
    assert m["reasoning_content"] == m["reasoning"] == "The user wants the weather in Paris."
    (call,) = m["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}

    chunks = stream(ctx, request("weather", tools=[WEATHER, TIME], stream=True))
    s = assemble(chunks)
    assert s["finish_reason"] == "tool_calls"
    assert s["message"]["reasoning_content"] == m["reasoning_content"] and s["message"]["content"] == ""
    (scall,) = s["message"]["tool_calls"]
    assert scall["function"] == call["function"]
    # reasoning went out token by token, then the call: header first, then argument pieces
    kinds = [k for c in chunks for ch in c["choices"] for k in ("reasoning_content", "tool_calls")
             if ch["delta"].get(k)]
    assert kinds.index("tool_calls") > 5 and kinds.count("tool_calls") > 5
    assert all(k == "tool_calls" for k in kinds[kinds.index("tool_calls"):])


def test_two_calls_tags_cut_across_deltas(engine):
    ctx = context(engine)
    for req_kw in ({}, {"stream": True}):
        req = request("two_calls", tools=[WEATHER, TIME], **req_kw)
        got = assemble(stream(ctx, req)) if req.stream else complete(ctx, req)["choices"][0]
        m = got["message"]
        assert got["finish_reason"] == "tool_calls"
        assert m["content"] == "I'll check both."
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in m["tool_calls"]] == [
            ("get_weather", {"city": "Paris"}), ("get_time", {})]
        assert len({c["id"] for c in m["tool_calls"]}) == 2
        # parallel_tool_calls false: the first call only
        req = request("two_calls", tools=[WEATHER, TIME], parallel_tool_calls=False, **req_kw)
        got = assemble(stream(ctx, req)) if req.stream else complete(ctx, req)["choices"][0]
        assert [c["function"]["name"] for c in got["message"]["tool_calls"]] == ["get_weather"]


def test_tool_choice_none_named_and_malformed(engine):
    ctx = context(engine)
    # none: the tools are in the prompt, the answer is not parsed for calls
    m = complete(ctx, request("weather", tools=[WEATHER], tool_choice="none"))["choices"][0]
    assert m["finish_reason"] == "stop" and "tool_calls" not in m["message"]
    assert m["message"]["content"].startswith("<tool_call>\n{\"name\": \"get_weather\"")
    # named: enforced by a grammar (tests/deployments/test_tool_choice_enforced.py): the model
    # that would write two calls writes one, to that function; OpenAI ends a forced call with "stop"
    named = {"type": "function", "function": {"name": "get_weather"}}
    m = complete(ctx, request("two_calls", tools=[WEATHER, TIME], tool_choice=named))["choices"][0]
    assert m["finish_reason"] == "stop" and not m["message"]["content"]
    assert [c["function"]["name"] for c in m["message"]["tool_calls"]] == ["get_weather"]
    # required: a model that would answer with text writes a call all the same
    m = complete(ctx, request("plain", tools=[WEATHER], tool_choice="required", max_tokens=64))["choices"][0]
    assert m["finish_reason"] in ("tool_calls", "length"), m
    if m["finish_reason"] == "tool_calls":
        assert [c["function"]["name"] for c in m["message"]["tool_calls"]] == ["get_weather"]
    # malformed JSON in the call: the text, verbatim
    for req_kw in ({}, {"stream": True}):
        req = request("malformed", tools=[WEATHER], **req_kw)
        if req.stream:  # the header went out before the arguments turned out malformed
            got = assemble(stream(ctx, req))
            assert got["finish_reason"] == "stop"
            continue
        m = complete(ctx, req)["choices"][0]
        assert "tool_calls" not in m["message"] and m["finish_reason"] == "stop"
        assert m["message"]["content"] == (
            '<tool_call>\n{"name": "get_weather", "arguments": {city: Paris}}\n</tool_call>')


def test_reasoning_streamed_then_content(engine):
    ctx = context(engine)
    chunks = stream(ctx, request("think_answer", stream=True))
    s = assemble(chunks)
    assert s["message"]["reasoning_content"] == "Two plus two." and s["message"]["content"] == "It is 4."
    assert s["finish_reason"] == "stop"
    deltas = [ch["delta"] for c in chunks for ch in c["choices"]]
    last_reasoning = max(i for i, d in enumerate(deltas) if d.get("reasoning_content"))
    first_content = min(i for i, d in enumerate(deltas) if d.get("content"))
    assert last_reasoning < first_content
    m = complete(ctx, request("think_answer"))["choices"][0]["message"]
    assert (m["reasoning_content"], m["content"]) == ("Two plus two.", "It is 4.")
    # include_reasoning false (vLLM's): the reasoning is dropped, not moved into content
    for req_kw in ({}, {"stream": True}):
        req = request("think_answer", include_reasoning=False, **req_kw)
        got = assemble(stream(ctx, req)) if req.stream else complete(ctx, req)["choices"][0]
        assert got["message"]["content"] == "It is 4." and not got["message"].get("reasoning_content")
    # parser off: the tags stay in the text
    m = complete(context(engine, reasoning_parser="none"), request("think_answer"))["choices"][0]["message"]
    assert m["content"] == "<think>\nTwo plus two.\n</think>\n\nIt is 4." and "reasoning_content" not in m


def test_enable_thinking_reaches_the_template(engine):
    ctx = context(engine)
    no_thinking = {"enable_thinking": False}
    _, _, plan = chat_completions.prepare(ctx, request("plain", chat_template_kwargs=no_thinking))
    assert plan.prompt_text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    # the prompt closed the block: whatever the model writes is the answer
    m = complete(ctx, request("think_answer", chat_template_kwargs={"enable_thinking": False}))["choices"][0]
    assert m["message"]["content"].startswith("<think>") and "reasoning_content" not in m["message"]


def test_a_template_that_opens_think(engine, tiny_dir, tmp_path):
    """Qwen3-Next-Thinking's template ends the prompt in `<think>\\n`: the output only closes it."""
    tok = engine.engine.tokenizer
    opened = type(tok).__new__(type(tok))
    opened.__dict__.update(tok.__dict__, chat_template=tok.chat_template.replace(
        "{{- '<|im_start|>assistant\\n' }}\n    {%- if enable_thinking",
        "{{- '<|im_start|>assistant\\n<think>\\n' }}\n    {%- if enable_thinking"))
    assert opened.chat_template != tok.chat_template
    ctx = ServingContext(engine=engine, tokenizer=opened, model_name="m", max_model_len=1024,
                         vocab_size=engine.engine.config.vocab_size, reasoning_parser="qwen3")
    m = complete(ctx, request("closes_think"))["choices"][0]["message"]
    assert (m["reasoning_content"], m["content"]) == ("Short thought.", "Hello!")
    s = assemble(stream(ctx, request("closes_think", stream=True)))["message"]
    assert (s["reasoning_content"], s["content"]) == ("Short thought.", "Hello!")


def test_tool_turns_render_as_transformers_renders_them(engine, tiny_dir):
    """Tools, an assistant turn with calls (OpenAI's arguments: JSON text) and tool results: the
    prompt equals transformers' apply_chat_template of the same conversation (arguments as an
    object, as transformers documents them)."""
    from transformers import AutoTokenizer

    call = {"id": "call_1", "type": "function", "index": 0,  # a client that rebuilt it from a stream
            "function": {"name": "get_weather", "arguments": '{"city": "Köln", "unit": "celsius"}'}}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Köln?"},
                {"role": "assistant", "content": None, "tool_calls": [call],
                 "reasoning_content": "Use the tool."},
                {"role": "tool", "tool_call_id": "call_1", "content": "21 C, sunny"}]
    req = request("plain", messages=messages, tools=[WEATHER, TIME])
    _, _, plan = chat_completions.prepare(context(engine), req)
    hf_messages = json.loads(json.dumps(messages))
    hf_messages[2]["content"] = ""
    hf_messages[2]["tool_calls"][0]["function"]["arguments"] = {"city": "Köln", "unit": "celsius"}
    want = AutoTokenizer.from_pretrained(tiny_dir).apply_chat_template(
        hf_messages, tools=[WEATHER, TIME], add_generation_prompt=True, tokenize=False)
    assert plan.prompt_text == want
    assert '<tools>\n{"type": "function", "function": {"name": "get_weather"' in want
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Köln", "unit": "celsius"}}\n'
            '</tool_call>') in want
    assert "<|im_start|>user\n<tool_response>\n21 C, sunny\n</tool_response><|im_end|>" in want


@pytest.mark.parametrize("kw,param,words", [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "nope"),
    ({"tools": [WEATHER, WEATHER]}, "tools", "same function name"),
])
def test_tool_fields_that_cannot_work_are_refused(engine, kw, param, words):
    with pytest.raises(APIError) as e:
        chat_completions.prepare(context(engine), request("plain", **kw))
    assert e.value.status == 400 and e.value.param == param and words in e.value.message


def test_without_a_parser_or_template_support_tools_are_refused(engine):
    with pytest.raises(APIError, match=r"serve\.tool_call_parser") as e:
        chat_completions.prepare(context(engine, tool_call_parser="none"), request("plain", tools=[WEATHER]))
    assert e.value.param == "tool_choice"
    # tool_choice none needs no parser
    chat_completions.prepare(context(engine, tool_call_parser="none"),
                             request("plain", tools=[WEATHER], tool_choice="none"))
    tok = engine.engine.tokenizer
    plain = type(tok).__new__(type(tok))
    plain.__dict__.update(tok.__dict__, chat_template="{% for m in messages %}{{ m['content'] }}{% endfor %}")
    ctx = ServingContext(engine=engine, tokenizer=plain, model_name="m", max_model_len=1024, vocab_size=512,
                         tool_call_parser="hermes")
    with pytest.raises(APIError, match="does not render tools") as e:
        chat_completions.prepare(ctx, request("plain", tools=[WEATHER]))
    assert e.value.param == "tools"


@pytest.mark.parametrize("body,words", [
    ({"messages": [{"role": "tool", "content": "x"}]}, "tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]},
     "not valid JSON"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "pattern"),
    ({"tools": [{"type": "code_interpreter"}]}, "function"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_tool_shapes_fail_validation(body, words):
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **body}
    with pytest.raises(ValueError, match=words):
        ChatCompletionRequest.model_validate(body)
