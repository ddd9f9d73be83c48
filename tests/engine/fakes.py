"""Fake executors for engine tests: they keep the tokens each slot has been fed, check that the
engine feeds them in order, and return logits that depend on a sequence's whole history, so any
mix-up of slots, positions or chunks changes the generated tokens."""

from __future__ import annotations

import time

import torch
from torch import Tensor

from engine.config import NextserveConfigError
from engine.executor import Executor, StepInput
from engine.llm_engine import LLMEngine
from model.config import ModelConfig

EOS = 1


def fake_config(vocab_size: int = 32, eos_token_id: int = EOS) -> ModelConfig:
    return ModelConfig.from_hf(dict(
        architectures=["Qwen3MoeForCausalLM"], vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
        num_experts=2, num_experts_per_tok=1,
        moe_intermediate_size=8, eos_token_id=eos_token_id, dtype="float32"))


def fake_logits(history: list[int], vocab_size: int) -> Tensor:
    """[V] float32 logits, a fixed function of the token history."""
    h = 0
    for t in history:
        h = (h * 1_000_003 + t + 1) % (2**61 - 1)
    return 3 * torch.randn(vocab_size, generator=torch.Generator().manual_seed(h))


def reference_greedy(prompt: list[int], max_tokens: int, vocab_size: int = 32,
                     eos: int | None = EOS) -> list[int]:
    """What a correct engine generates greedily for `prompt`, one sequence at a time."""
    tokens, out = list(prompt), []
    while len(out) < max_tokens:
        t = int(fake_logits(tokens, vocab_size).argmax())
        out.append(t)
        tokens.append(t)
        if t == eos:
            break
    return out


class FakeExecutor(Executor):
    def __init__(self, num_slots: int = 4, max_model_len: int = 64, vocab_size: int = 32) -> None:
        self.config = fake_config(vocab_size)
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.fed: dict[int, list[int]] = {s: [] for s in range(num_slots)}  # tokens in each slot
        self.steps: list[StepInput] = []

    def execute(self, step: StepInput) -> Tensor:
        self.steps.append(step)
        owner: list[int] = []  # slot of each packed token
        offset = 0
        for slot, start, n in zip(step.slots, step.starts, step.lengths, strict=True):
            fed = self.fed[slot]
            if start == 0:  # a new owner; what the last one left is ignored, as in model/cache.py
                fed.clear()
            if start != len(fed):
                raise AssertionError(f"slot {slot}: step starts at {start} but {len(fed)} tokens are cached")
            if start + n > self.max_model_len:
                raise AssertionError(f"slot {slot}: {start + n} tokens exceed max_model_len")
            fed.extend(step.token_ids[offset:offset + n])
            owner += [slot] * n
            offset += n
        rows = []
        for i in step.logits_index:
            slot = owner[i]
            # Logits of packed token i see the slot's history up to and including token i.
            upto = len(self.fed[slot]) - (owner[i + 1:].count(slot))
            rows.append(fake_logits(self.fed[slot][:upto], self.config.vocab_size))
        if not rows:
            return torch.empty(0, self.config.vocab_size)
        return torch.stack(rows)


class PagedFakeExecutor(FakeExecutor):
    """Keeps each sequence's tokens in a pool of `num_kv_blocks` blocks, placed and found through
    the step's block tables only: a wrong, shared or stale table feeds the logits wrong history."""

    def __init__(self, num_kv_blocks: int, block_size: int = 4, **kwargs) -> None:
        super().__init__(**kwargs)
        self.num_kv_blocks, self.block_size = num_kv_blocks, block_size
        self.pool: list[int | None] = [None] * (num_kv_blocks * block_size)
        self.max_blocks_used = 0

    def _at(self, table: tuple[int, ...], position: int) -> int:
        return table[position // self.block_size] * self.block_size + position % self.block_size

    def execute(self, step: StepInput) -> torch.Tensor:
        self.steps.append(step)
        assert step.block_tables is not None
        ids = [b for t in step.block_tables for b in t]
        assert len(ids) == len(set(ids)) and all(0 <= b < self.num_kv_blocks for b in ids)  # no sharing
        self.max_blocks_used = max(self.max_blocks_used, len(ids))
        history = []  # per packed token: the sequence's tokens up to and including it
        offset = 0
        for table, start, n in zip(step.block_tables, step.starts, step.lengths, strict=True):
            assert len(table) * self.block_size >= start + n
            for i in range(n):
                self.pool[self._at(table, start + i)] = step.token_ids[offset + i]
            for i in range(n):
                history.append([self.pool[self._at(table, p)] for p in range(start + i + 1)])
            offset += n
        rows = [fake_logits(history[i], self.config.vocab_size) for i in step.logits_index]
        return torch.stack(rows) if rows else torch.empty(0, self.config.vocab_size)


class SlowFakeExecutor(FakeExecutor):
    """A fake whose steps take `step_s`, so a test can act while requests are in flight."""

    def __init__(self, step_s: float, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.step_s = step_s

    def execute(self, step: StepInput) -> Tensor:
        time.sleep(self.step_s)
        return super().execute(step)


class CompilingFakeExecutor(FakeExecutor):
    """A fake whose decode buckets 1, 2, 4 "compile in the background": one more is ready every
    `compile_s` seconds after it was built (what engine.compile's compiled_buckets reports)."""

    BUCKETS = (1, 2, 4)

    def __init__(self, compile_s: float, **kwargs: int) -> None:
        super().__init__(**kwargs)
        self.compile_s, self.t0 = compile_s, time.monotonic()

    def compiled_buckets(self) -> tuple[tuple[int, ...], bool]:
        n = min(len(self.BUCKETS), int((time.monotonic() - self.t0) / self.compile_s))
        return self.BUCKETS[:n], n < len(self.BUCKETS)


def build_fake_engine(num_slots: int = 2, max_model_len: int = 64, step_s: float = 0.0,
                      fail: str | None = None, compile_s: float = 0.0) -> LLMEngine:
    """An LLMEngine over a fake executor, for an engine core process to build (picklable through
    functools.partial); `fail`: raise NextserveConfigError with this text instead; `compile_s`:
    over CompilingFakeExecutor."""
    if fail is not None:
        raise NextserveConfigError(fail)
    if compile_s:
        return LLMEngine(CompilingFakeExecutor(compile_s, num_slots=num_slots, max_model_len=max_model_len))
    executor = (SlowFakeExecutor(step_s, num_slots=num_slots, max_model_len=max_model_len) if step_s
                else FakeExecutor(num_slots=num_slots, max_model_len=max_model_len))
    return LLMEngine(executor)
