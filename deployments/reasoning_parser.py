"""Reasoning separated from the answer: a Qwen3 model thinks inside `<think>...</think>` and
answers after it. The parser works on text deltas as they stream (a tag may arrive in pieces,
or inside a longer piece), and the whole output is the same thing fed at once, so a streamed
answer and a non-streamed one always agree.

Where the reasoning starts depends on the chat template, so the parser reads the prompt's end:
- it ends in an open `<think>` (Qwen3-Next-Thinking and the Thinking-2507 templates put it
  there): the output is reasoning until `</think>`, and a `<think>` the model repeats is dropped;
- it ends in a closed block (`<think>\\n\\n</think>`: Qwen3's template with enable_thinking
  false): the output is all answer;
- otherwise (Qwen3's hybrid template, thinking on; instruct models): the output is reasoning
  only if it opens with `<think>`, else all answer.
Reasoning that never reaches `</think>` (cut by max_tokens) is all reasoning, as vLLM's qwen3
parser has it. Newlines next to the tags are not part of either text (Qwen3's template strips
them too when it renders a past turn back)."""

from __future__ import annotations

from typing import Literal

START, END = "<think>", "</think>"
ReasoningParserName = Literal["qwen3", "none"]

_PENDING, _REASONING, _CONTENT = "pending", "reasoning", "content"


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a proper beginning of `tag`: text that may
    still become the tag once more arrives."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


class Qwen3ReasoningParser:
    def __init__(self, prompt_text: str) -> None:
        tail = prompt_text.rstrip()
        self.opened_by_prompt = tail.endswith(START)
        self._state = _CONTENT if tail.endswith(END) else _PENDING
        self._buf = ""
        self._lead = True  # at the start of the current text: its leading newlines are dropped
        self.reasoning_seen = False  # the output had a reasoning part (maybe empty)

    def feed(self, text: str) -> tuple[str, str]:
        """(reasoning, content) that `text` completes; what may still turn into a tag is held."""
        self._buf += text
        return self._advance(final=False)

    def finish(self) -> tuple[str, str]:
        """Everything still held, at the end of the output."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> tuple[str, str]:
        reasoning, content = [], []
        while True:
            if self._state == _PENDING:
                head = self._buf.lstrip()
                if head.startswith(START):
                    self._buf = head[len(START):]
                    self._enter(_REASONING)
                elif not final and START.startswith(head):
                    break  # only whitespace or the beginning of <think> so far
                else:
                    self._enter(_REASONING if self.opened_by_prompt else _CONTENT)
                continue
            if self._state == _REASONING:
                i = self._buf.find(END)
                if i >= 0:
                    reasoning.append(self._strip_lead(self._buf[:i].rstrip("\n")))
                    self._buf = self._buf[i + len(END):]
                    self._enter(_CONTENT)
                    continue
                # hold what may become </think>, and the newlines before it
                keep = 0 if final else partial_suffix(self._buf, END)
                body = self._buf[:len(self._buf) - keep].rstrip("\n")
                if final:
                    body, self._buf = self._buf.rstrip("\n"), ""
                else:
                    self._buf = self._buf[len(body):]
                reasoning.append(self._strip_lead(body))
                break
            # content: everything, less the newlines right after </think>
            piece = self._strip_lead(self._buf)
            self._buf = ""
            content.append(piece)
            break
        return "".join(reasoning), "".join(content)

    def _enter(self, state: str) -> None:
        self._state, self._lead = state, True
        if state == _REASONING:
            self.reasoning_seen = True

    def _strip_lead(self, text: str) -> str:
        if self._lead and text:
            text = text.lstrip("\n")
            self._lead = not text
        return text


def parse_reasoning(prompt_text: str, output: str) -> tuple[str | None, str]:
    """The whole output at once: (reasoning or None when the output had no reasoning part,
    content)."""
    parser = Qwen3ReasoningParser(prompt_text)
    r1, c1 = parser.feed(output)
    r2, c2 = parser.finish()
    return (r1 + r2 if parser.reasoning_seen else None), c1 + c2
