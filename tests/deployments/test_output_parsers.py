"""The chat API's output parsers on their own: tool calls (hermes) and reasoning (qwen3), fed
whole and as streams cut everywhere (every place a delta can end, tags and JSON cut inside),
which must add up to the same answer."""

from __future__ import annotations

import json
import random

import pytest

from deployments.reasoning_parser import Qwen3ReasoningParser, parse_reasoning
from deployments.tool_parser import CallArguments, CallHeader, Content, HermesToolParser, parse_tool_calls
from tests.deployments.scripted_model import SCRIPTS, script_text

TOOLS = {"get_weather", "get_time"}
HYBRID = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # Qwen3's template, thinking on
OPENED = HYBRID + "<think>\n"  # Qwen3-Next-Thinking's: the template opens the block
CLOSED = HYBRID + "<think>\n\n</think>\n\n"  # enable_thinking=false


def stream_tools(deltas: list[str], allowed=TOOLS, max_calls=None):
    """(content, [(id, name, arguments)], headers first?) from a streamed answer."""
    parser = HermesToolParser(set(allowed), max_calls)
    events = [e for d in deltas for e in parser.feed(d)] + parser.finish()
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls: dict[int, list[str]] = {}
    broken = {c.index for c in parser.calls if c.broken}
    for e in events:
        if isinstance(e, CallHeader):
            assert e.index not in calls and e.index == len(calls)  # the header opens each call
            calls[e.index] = [e.id, e.name, ""]
        elif isinstance(e, CallArguments):
            calls[e.index][2] += e.text  # never before its header
    return content, [tuple(c) for i, c in calls.items() if i not in broken]


def whole_tools(text: str, allowed=TOOLS, max_calls=None):
    out = parse_tool_calls(text, set(allowed), max_calls)
    return out.content, [(c.id, c.name, c.arguments) for c in out.calls]


def splits(text: str, rng: random.Random, n: int = 30):
    """Cuts at every single place, then random multi-cut streams, then one character at a time."""
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    for _ in range(n):
        cuts = sorted(rng.sample(range(1, len(text)), k=min(len(text) - 1, rng.randint(2, 12))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    yield list(text)


def same(a, b):
    """Equal but for the calls' ids (new for each parse)."""
    return a[0] == b[0] and [c[1:] for c in a[1]] == [c[1:] for c in b[1]]


@pytest.mark.parametrize("text", [
    script_text("two_calls"), script_text("plain"), script_text("weather").split("</think>")[1],
    # malformed before a header could go out: text in a stream too
    'ok <tool_call>\n{"name": get_weather, "arguments": {}}\n</tool_call>',
    '<tool_call>{"name": "nope", "arguments": {}}</tool_call> <tool_call>{"name": "get_time", '
    '"arguments": {"s": "}{\\"</tool_call>"}}</tool_call>',
])
def test_streamed_tool_calls_equal_the_whole_answer_however_cut(text):
    want = whole_tools(text)
    rng = random.Random(0)
    for deltas in splits(text, rng):
        assert same(stream_tools(deltas), want), deltas


def test_qwen3_shaped_call_streams_header_first_then_argument_pieces():
    pieces = SCRIPTS["weather"][SCRIPTS["weather"].index("\n\n") + 1:]  # the answer after </think>
    parser = HermesToolParser(TOOLS)
    per_delta = [parser.feed(p) for p in pieces] + [parser.finish()]
    flat = [e for events in per_delta for e in events]
    header = next(e for e in flat if isinstance(e, CallHeader))
    assert header.name == "get_weather" and header.id.startswith("call_") and len(header.id) == 29
    pieces_of_args = [e.text for e in flat if isinstance(e, CallArguments)]
    assert len(pieces_of_args) > 5  # streamed as they came, not at the end
    assert json.loads("".join(pieces_of_args)) == {"city": "Paris", "unit": "celsius"}
    assert flat.index(header) < flat.index(next(e for e in flat if isinstance(e, CallArguments)))
    assert not any(isinstance(e, Content) for e in flat)  # the newlines around the call are not text
    # the header went out as soon as `"arguments": {` was complete, before the call ended
    sent_at = next(i for i, events in enumerate(per_delta) if any(isinstance(e, CallHeader) for e in events))
    assert pieces[sent_at] == ' {"'
    # the argument piece of the token '"}}' is its first brace only: the second closes the call
    assert pieces_of_args[-1] == '"}'


def test_whole_answer_tool_calls():
    content, calls = whole_tools(script_text("two_calls"))
    assert content == "I'll check both."
    assert [(n, json.loads(a)) for _, n, a in calls] == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    assert len({i for i, _, _ in calls}) == 2


def test_malformed_or_refused_calls_stay_text():
    text = script_text("malformed")
    assert whole_tools(text) == (text, [])
    # a function the request did not offer: text, verbatim
    assert whole_tools(script_text("two_calls"), allowed={"get_time"})[0] == (
        "I'll check both.\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
    # unclosed but complete JSON (max_tokens cut the end tag): a call, as vLLM's parser has it
    content, calls = whole_tools('<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n')
    assert content == "" and calls[0][1:] == ("get_time", '{"tz": "UTC"}')
    # cut inside the JSON: text
    cut = '<tool_call>\n{"name": "get_time", "argu'
    assert whole_tools(cut) == (cut, [])
    # keys in another order, arguments missing: checked whole, then a call
    assert whole_tools('<tool_call>{"arguments": {"a": [1]}, "name": "get_time"}</tool_call>')[1][0][1:] == (
        "get_time", '{"a": [1]}')
    assert whole_tools('<tool_call>{"name": "get_time"}</tool_call>')[1][0][1:] == ("get_time", "{}")
    # arguments not an object: text
    assert whole_tools('<tool_call>{"name": "get_time", "arguments": "x"}</tool_call>')[1] == []


def test_streamed_call_broken_after_its_header_is_marked():
    text = '<tool_call>\n{"name": "get_time", "arguments": {"a": 1]}\n</tool_call>'
    parser = HermesToolParser(TOOLS)
    events = parser.feed(text) + parser.finish()
    assert any(isinstance(e, CallHeader) for e in events)
    assert parser.calls[0].broken and parser.valid_calls == []
    assert whole_tools(text) == (text, [])  # the whole answer shows it as text


def test_parallel_tool_calls_false_keeps_the_first_call():
    content, calls = whole_tools(script_text("two_calls"), max_calls=1)
    assert content == "I'll check both." and [c[1] for c in calls] == ["get_weather"]
    assert same(stream_tools(SCRIPTS["two_calls"], max_calls=1), (content, calls))


def test_text_between_and_after_calls():
    text = 'A\n<tool_call>{"name": "get_time", "arguments": {}}</tool_call>\n B \n<tool_call>' \
           '{"name": "get_time", "arguments": {}}</tool_call>\n\n'
    content, calls = whole_tools(text)
    assert content == "A\n\n B" and len(calls) == 2
    for deltas in splits(text, random.Random(1)):
        assert same(stream_tools(deltas), (content, calls))
    # no calls: the answer is untouched, trailing whitespace and half-tags included
    for text in ["Hello\n", "a <tool", "x <tool_cal"]:
        assert whole_tools(text) == (text, [])


# -- reasoning -------------------------------------------------------------------------------
def stream_reasoning(prompt: str, deltas: list[str]) -> tuple[str | None, str]:
    parser = Qwen3ReasoningParser(prompt)
    parts = [parser.feed(d) for d in deltas] + [parser.finish()]
    reasoning = "".join(r for r, _ in parts)
    return (reasoning if parser.reasoning_seen else None), "".join(c for _, c in parts)


@pytest.mark.parametrize("prompt,output,want", [
    (HYBRID, "<think>\nTwo plus two.\n</think>\n\nIt is 4.", ("Two plus two.", "It is 4.")),
    (HYBRID, "It is 4.", (None, "It is 4.")),  # an instruct model, or no thinking
    (HYBRID, "<think>\nstill thinking", ("still thinking", "")),  # cut by max_tokens
    (HYBRID, "\n<think>\n\n</think>\n\nHi", ("", "Hi")),
    (HYBRID, "<thinking is fun>", (None, "<thinking is fun>")),
    (OPENED, "Short thought.\n</think>\n\nHello!", ("Short thought.", "Hello!")),
    (OPENED, "<think>\nagain\n</think>\n\nHi", ("again", "Hi")),  # a repeated <think> is dropped
    (OPENED, "never closed", ("never closed", "")),
    (CLOSED, "Hello <think>", (None, "Hello <think>")),  # enable_thinking=false: all answer
    (HYBRID, "<think>a</think>b</think>c", ("a", "b</think>c")),
])
def test_reasoning_split_whole_and_streamed(prompt, output, want):
    assert parse_reasoning(prompt, output) == want
    for deltas in splits(output, random.Random(2), n=10):
        assert stream_reasoning(prompt, deltas) == want, deltas


def test_reasoning_of_qwen3_shaped_tokens():
    pieces = SCRIPTS["think_answer"]
    assert stream_reasoning(HYBRID, pieces) == ("Two plus two.", "It is 4.")
    parser = Qwen3ReasoningParser(HYBRID)
    outs = [parser.feed(p) for p in pieces]
    # reasoning streams while it is written; the cut tag `</thi` `nk>` never shows up in either
    assert [r for r, _ in outs[:6] if r] == ["Two", " plus", " two", "."]
    assert all("<" not in r + c for r, c in outs)
