"""Tool calls in the answer text, in the hermes form Qwen3 is trained on (vLLM's `hermes` tool
parser):

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

The parser works on text deltas as they stream and reports events: answer text, a call's
header (index, id, name: sent first, as OpenAI streams a call), and pieces of its arguments as
they arrive. Arguments stream as the model writes them (the JSON text of the object, verbatim)
once the header `{"name": "...", "arguments": ` is complete; a call written any other way
(keys in another order, arguments not an object) is checked whole at `</tool_call>` and then
sent in one piece. A call is valid when its JSON parses into a `name` this request offered
and an `arguments` object; an invalid or refused call falls back to answer text, verbatim.
A call cut off before `</tool_call>` counts if its JSON is complete (as vLLM's parser has it).
One limit of streaming: a call whose header went out and whose arguments then turn out not to
be JSON cannot be taken back; it ends with the arguments sent so far (`broken` marks it, and
a non-streamed answer shows its text as answer text instead).

The answer text is the output with the calls cut out; whitespace where it meets a call at its
start or end is not part of it (Qwen3's template writes a newline between the answer and its
calls when it renders a past turn back), whitespace between two pieces of text stays."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Literal

from deployments.reasoning_parser import partial_suffix

OPEN, CLOSE = "<tool_call>", "</tool_call>"
ToolCallParserName = Literal["hermes", "none"]
# the header Qwen3 writes, up to the start of the arguments value
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\\x00-\x1f]|\\.)*)"\s*,\s*"arguments"\s*:\s*')


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class Content:
    text: str


@dataclass(frozen=True)
class CallHeader:
    index: int
    id: str
    name: str


@dataclass(frozen=True)
class CallArguments:
    index: int
    text: str


Event = Content | CallHeader | CallArguments


@dataclass
class ToolCall:
    index: int
    id: str
    name: str
    arguments: str = ""
    raw: str = ""  # the call's text, <tool_call> to </tool_call>
    broken: bool = False  # header sent, arguments turned out malformed (streaming only)


class _ArgsScanner:
    """Where a JSON object's text ends, one character at a time (strings, escapes, nesting);
    `bad` when the brackets cannot be JSON."""

    def __init__(self) -> None:
        self.stack: list[str] = []
        self.in_string = self.escape = False
        self.done = self.bad = False

    def take(self, text: str) -> int:
        """How many characters of `text` belong to the value (all of them until it ends)."""
        for i, ch in enumerate(text):
            if self.in_string:
                if self.escape:
                    self.escape = False
                elif ch == "\\":
                    self.escape = True
                elif ch == '"':
                    self.in_string = False
                continue
            if ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.stack.append("}" if ch == "{" else "]")
            elif ch in "}]":
                if not self.stack or self.stack.pop() != ch:
                    self.bad = self.done = True
                    return i + 1
                if not self.stack:
                    self.done = True
                    return i + 1
        return len(text)


class HermesToolParser:
    """`allowed`: the function names the request offered (a call to another name is answer
    text); `max_calls`: 1 for parallel_tool_calls false (later calls are dropped)."""

    def __init__(self, allowed: set[str], max_calls: int | None = None) -> None:
        self.allowed, self.max_calls = allowed, max_calls
        self.calls: list[ToolCall] = []  # headers sent, in order
        self._buf = ""
        self._in_call = False
        self._call: ToolCall | None = None  # the open call, once its header is out
        self._args: _ArgsScanner | None = None
        self._args_text = ""
        self._refused = False  # the open call's name is not allowed: it ends as text
        self._opaque = False  # the open call is not written header first: checked whole at its end
        self._head_len = 0  # where the open call's arguments start in its text
        self._calls_seen = 0
        self._ws = ""  # held whitespace of the answer text
        self._text_sent = False

    @property
    def valid_calls(self) -> list[ToolCall]:
        return [c for c in self.calls if not c.broken]

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        return self._advance(final=False)

    def finish(self) -> list[Event]:
        return self._advance(final=True)

    # -- the state machine ------------------------------------------------------------------
    def _advance(self, final: bool) -> list[Event]:
        events: list[Event] = []
        while True:
            if self._in_call:
                if not self._in_call_step(events, final):
                    return events
                continue
            i = self._buf.find(OPEN)
            if i >= 0:
                self._text(self._buf[:i], events)
                self._buf = self._buf[i + len(OPEN):]
                self._open_call()
                continue
            if final:
                self._text(self._buf, events)
                if self._ws and not self._calls_seen:  # a plain answer keeps its trailing whitespace
                    events.append(Content(self._ws))
                self._buf = self._ws = ""
                return events
            keep = partial_suffix(self._buf, OPEN)  # what may become <tool_call>
            self._text(self._buf[:len(self._buf) - keep], events)
            self._buf = self._buf[len(self._buf) - keep:]
            return events

    def _text(self, text: str, events: list[Event]) -> None:
        """Answer text. Whitespace is held until text follows it: whitespace that only touches
        calls (before, between, after them) is not part of the answer."""
        text = self._ws + text
        body = text.rstrip()
        self._ws = text[len(body):]
        if body and self._calls_seen and not self._text_sent:
            body = body.lstrip()  # the answer starts after calls: no separator before it
        if body:
            events.append(Content(body))
            self._text_sent = True

    def _open_call(self) -> None:
        self._in_call, self._call, self._args, self._args_text = True, None, None, ""
        self._refused = self._opaque = False
        self._calls_seen += 1

    def _in_call_step(self, events: list[Event], final: bool) -> bool:
        """Advance the open call; True when it ended and parsing goes on after it."""
        buf = self._buf
        if self._call is None and not self._refused and not self._opaque:
            first_end = buf.find(CLOSE)
            head = buf if first_end < 0 else buf[:first_end]
            m = _HEAD.match(head)
            if m is not None and (m.end() < len(head) or first_end >= 0 or final):
                try:
                    name = json.loads(f'"{m.group(1)}"')
                except ValueError:
                    name = None
                if name not in self.allowed:
                    self._refused = True
                elif self._full():
                    self._refused = True  # parallel_tool_calls false: only the first call
                elif not head[m.end():].startswith("{"):
                    self._opaque = True
                else:
                    self._call = ToolCall(len(self.calls), new_call_id(), name)
                    self.calls.append(self._call)
                    events.append(CallHeader(self._call.index, self._call.id, name))
                    self._args, self._head_len = _ArgsScanner(), m.end()
        if self._call is not None and self._args is not None:
            # stream the arguments' text that arrived; </tool_call> counts only after them (a
            # string in the arguments may contain it)
            start = self._head_len + len(self._args_text)
            if not self._args.done and start < len(buf):
                n = self._args.take(buf[start:])
                piece = buf[start:start + n]
                if piece:
                    self._args_text += piece
                    self._call.arguments += piece
                    events.append(CallArguments(self._call.index, piece))
            end = buf.find(CLOSE, self._head_len + len(self._args_text)) if self._args.done else -1
        else:
            end = buf.find(CLOSE)
        if end < 0 and not final:
            return False
        # the call's text is complete (or the output ended): check it whole
        body = buf if end < 0 else buf[:end]
        raw = OPEN + (body if end < 0 else body + CLOSE)
        self._buf = "" if end < 0 else buf[end + len(CLOSE):]
        self._in_call = False
        self._finish_call(body, raw, events)
        return True

    def _full(self) -> bool:
        return self.max_calls is not None and len(self.calls) >= self.max_calls

    def _finish_call(self, body: str, raw: str, events: list[Event]) -> None:
        call = self._call
        parsed = _parse_call(body)
        if call is not None:
            call.raw = raw
            if (parsed is None or parsed[0] != call.name or self._args is None or self._args.bad
                    or not self._args.done or _json_object(self._args_text) is None):
                call.broken = True
            return
        if self._full() and parsed is not None and parsed[0] in self.allowed:
            return  # a valid call past parallel_tool_calls=false's one: dropped
        if parsed is None or parsed[0] not in self.allowed:
            self._text(raw, events)  # not a call this request can take: it stays text
            return
        name, arguments = parsed
        call = ToolCall(len(self.calls), new_call_id(), name, arguments, raw)
        self.calls.append(call)
        events += [CallHeader(call.index, call.id, name), CallArguments(call.index, arguments)]


def _json_object(text: str) -> dict | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _parse_call(body: str) -> tuple[str, str] | None:
    """(name, arguments as JSON text) of a call's JSON, or None when it is not one."""
    obj = _json_object(body)
    if obj is None or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


@dataclass
class ParsedOutput:
    content: str
    calls: list[ToolCall] = field(default_factory=list)


def parse_tool_calls(text: str, allowed: set[str], max_calls: int | None = None) -> ParsedOutput:
    """The whole answer at once. A call that is not valid is answer text, where it stood."""
    parser = HermesToolParser(allowed, max_calls)
    events = parser.feed(text) + parser.finish()
    content: list[str] = []
    broken = {c.index: c for c in parser.calls if c.broken}
    for e in events:
        if isinstance(e, Content):
            content.append(e.text)
        elif isinstance(e, CallHeader) and e.index in broken:
            content.append(broken[e.index].raw)
    calls = parser.valid_calls
    for i, c in enumerate(calls):
        c.index = i
    return ParsedOutput("".join(content), calls)
