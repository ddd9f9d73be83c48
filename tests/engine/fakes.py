"""A fake executor for engine tests: it keeps the tokens each slot has been fed, checks that the
engine feeds them in order, and returns logits that depend on a sequence's whole history, so any
mix-up of slots, positions or chunks changes the generated tokens."""

from __future__ import annotations

import torch
from torch import Tensor

from engine.executor import Executor, StepInput
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
        self.released: list[int] = []

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

    def release(self, slots: list[int]) -> None:
        self.released += slots
