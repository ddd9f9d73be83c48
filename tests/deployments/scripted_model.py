"""A fixed-output model for the chat API's tests: an executor that writes a scripted answer token
by token through the real engine (scheduler, sampler, detokenizer), so the HTTP routes and
their parsers see what a real checkpoint's stream looks like. The prompt picks the script: the
first `[[NAME]]` in it names one of SCRIPTS. A script is a list of text pieces, each encoded on
its own, so token boundaries fall where a real Qwen3 tokenizer puts them (`":`, ` {"`, `"}}`),
and a piece may cut a tag in two (`<too`, `l_call>`), which the engine then streams as two
deltas."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from engine.executor import Executor, StepInput
from engine.tokenizer import Tokenizer
from model.config import ModelConfig

# A Qwen3 turn that thinks, then calls a tool: the pieces are Qwen3's own tokens for this text
# (tags are single tokens in its vocabulary; JSON punctuation merges into tokens such as `":`).
WEATHER_CALL = [
    "<think>", "\n", "The", " user", " wants", " the", " weather", " in", " Paris", ".", "\n", "</think>",
    "\n\n", "<tool_call>", "\n", '{"', "name", '":', ' "', "get", "_weather", '",', ' "', "arguments",
    '":', ' {"', "city", '":', ' "', "Paris", '",', ' "', "unit", '":', ' "', "c", "elsius", '"}}', "\n",
    "</tool_call>",
]
SCRIPTS: dict[str, list[str]] = {
    "weather": WEATHER_CALL,
    # two calls, text first, and tags cut inside (a tokenizer without them as single tokens)
    "two_calls": [
        "I", "'ll", " check", " both", ".", "\n", "<too", "l_call>", "\n", '{"name": "get_weather", "arg',
        'uments": {"city": "Par', 'is"}}\n</tool', "_call>", "\n", "<tool_call>", '\n{"name": "get_time", ',
        '"arguments": {}}\n', "</tool_call>",
    ],
    "think_answer": ["<think>", "\n", "Two", " plus", " two", ".", "\n", "</thi", "nk>", "\n\n", "It", " is",
                     " 4", "."],
    # the template opened <think>: the output only closes it
    "closes_think": ["Short", " thought", ".", "\n", "</think>", "\n\n", "Hello", "!"],
    "plain": ["Hello", " there", "!"],
    "malformed": ["<tool_call>", "\n", '{"', "name", '":', ' "', "get", "_weather", '",', ' "', "arguments",
                  '":', " {", "city", ":", " Paris", "}}", "\n", "</tool_call>"],
}
EOS_TEXT = "<|im_end|>"


def script_text(name: str) -> str:
    return "".join(SCRIPTS[name])


class ScriptedExecutor(Executor):
    """Slots keep what they were fed (as tests/engine/fakes.FakeExecutor's do); a slot's first
    logits request after a new prompt marks where the prompt ends, and each later one returns
    logits that pick the script's next token, then EOS."""

    def __init__(self, model_dir: str | Path, num_slots: int = 4, max_model_len: int = 512,
                 step_s: float = 0.005) -> None:
        self.step_s = step_s  # a step takes this long, so a stream's reader keeps up with it
        self.tokenizer = Tokenizer(model_dir)
        self.config = ModelConfig.from_dir(model_dir)
        self.num_slots, self.max_model_len = num_slots, max_model_len
        self.fed: dict[int, list[int]] = {s: [] for s in range(num_slots)}
        self.prompt_len: dict[int, int | None] = {s: None for s in range(num_slots)}
        self.script: dict[int, list[int]] = {}
        self.eos = self.tokenizer.encode(EOS_TEXT, add_special_tokens=False)[0]

    def _script_ids(self, prompt: list[int]) -> list[int]:
        m = re.search(r"\[\[(\w+)\]\]", self.tokenizer.decode(prompt, skip_special_tokens=False))
        pieces = SCRIPTS[m.group(1)] if m else SCRIPTS["plain"]
        return [t for p in pieces for t in self.tokenizer.encode(p, add_special_tokens=False)] + [self.eos]

    def execute(self, step: StepInput) -> Tensor:
        time.sleep(self.step_s)
        owner: list[int] = []
        offset = 0
        for slot, start, n in zip(step.slots, step.starts, step.lengths, strict=True):
            if start == 0:
                self.fed[slot], self.prompt_len[slot] = [], None
            assert start == len(self.fed[slot]), "the engine fed a slot out of order"
            self.fed[slot] += step.token_ids[offset:offset + n]
            owner += [slot] * n
            offset += n
        rows = []
        for i in step.logits_index:
            slot = owner[i]
            upto = len(self.fed[slot]) - owner[i + 1:].count(slot)
            if self.prompt_len[slot] is None:
                self.prompt_len[slot] = upto
                self.script[slot] = self._script_ids(self.fed[slot][:upto])
            script, done = self.script[slot], upto - self.prompt_len[slot]
            row = torch.zeros(self.config.vocab_size)
            row[script[done] if done < len(script) else self.eos] = 100.0
            rows.append(row)
        return torch.stack(rows) if rows else torch.empty(0, self.config.vocab_size)


def scripted_engine(config: Any) -> tuple[Any, Tokenizer, int]:
    """The Serve app's engine factory: the real AsyncLLMEngine over the scripted executor."""
    from engine.async_engine import AsyncLLMEngine
    from engine.llm_engine import LLMEngine

    executor = ScriptedExecutor(config.model, num_slots=config.engine.max_num_seqs,
                                max_model_len=config.engine.max_model_len)
    engine = LLMEngine(executor, tokenizer=executor.tokenizer)
    async_engine = AsyncLLMEngine(engine, config.serve.max_queued_requests)
    return async_engine, executor.tokenizer, executor.max_model_len
