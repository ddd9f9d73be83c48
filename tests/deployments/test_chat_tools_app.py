"""Tool calls and reasoning over HTTP with the official `openai` client: the Serve app, the real
engine, and a scripted model that writes what a Qwen3 model writes (scripted_model.py), so
the whole path (template, engine, detokenizer, parsers, SSE, the client's own types) is the
one a user's agent framework takes.

Starts Ray: run inside a loopback-only network namespace:
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest FILE'"""

from __future__ import annotations

import json

import openai
import pytest

ray = pytest.importorskip("ray")

from tests.deployments.scripted_model import scripted_engine  # noqa: E402
from tests.deployments.test_chat_tools import TIME, WEATHER  # noqa: E402
from tests.serve_app import running_app  # noqa: E402

MODEL = "qwen3-scripted"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from model.tiny import make_tiny_model

    tiny_dir = make_tiny_model(tmp_path_factory.mktemp("tools-app"), arch="qwen3_next")
    args = dict(model=str(tiny_dir), dtype="float32", executor="local",
                engine=dict(max_num_seqs=2, max_model_len=1024, engine_process="inline"),
                serve=dict(served_model_name=MODEL, torch_threads=1))
    with running_app(args, num_cpus=2, engine_factory=scripted_engine) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)


def ask(script: str) -> list[dict]:
    return [{"role": "user", "content": f"[[{script}]] What is the weather in Paris?"}]


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


def test_tool_call_and_the_turn_after_it(client):
    r = client.chat.completions.create(model=MODEL, messages=ask("weather"), tools=[WEATHER, TIME])
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls"
    m = choice.message
    assert m.content is None and extra(m, "reasoning_content") == "The user wants the weather in Paris."
    (call,) = m.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    # the agent runs the tool and sends the call and its result back
    history = [*ask("plain"), m.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "21 C, sunny"}]
    r2 = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER, TIME])
    assert r2.choices[0].message.content == "Hello there!" and r2.choices[0].finish_reason == "stop"
    assert r2.usage.prompt_tokens > r.usage.prompt_tokens  # the call and the result are in the prompt


def test_streamed_tool_calls(client):
    stream = client.chat.completions.create(model=MODEL, messages=ask("two_calls"), tools=[WEATHER, TIME],
                                            stream=True)
    content, calls, finish, first_pieces = "", {}, None, {}
    for chunk in stream:
        if not chunk.choices:
            continue
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for t in delta.tool_calls or ():
            if t.index not in calls:
                first_pieces[t.index] = t
                calls[t.index] = {"id": t.id, "name": t.function.name, "arguments": ""}
            calls[t.index]["arguments"] += t.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and content == "I'll check both."
    assert all(p.id and p.type == "function" and p.function.name for p in first_pieces.values())
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]


def test_streamed_reasoning(client):
    stream = client.chat.completions.create(model=MODEL, messages=ask("think_answer"), stream=True)
    reasoning, content, order = "", "", []
    for chunk in stream:
        if chunk.choices:
            d = chunk.choices[0].delta
            if extra(d, "reasoning_content"):
                reasoning += extra(d, "reasoning_content")
                order.append("r")
            if d.content:
                content += d.content
                order.append("c")
    assert (reasoning, content) == ("Two plus two.", "It is 4.")
    # reasoning streamed, then the answer
    assert order == sorted(order, reverse=True) and order.count("r") > 2


def test_tool_errors_name_the_field(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ask("plain"), tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}])
    assert "tool_call_id" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:  # /v1/completions takes no tools
        client.completions.create(model=MODEL, prompt="hi", extra_body={"tools": [WEATHER]})
    assert e.value.body["param"] == "tools"
