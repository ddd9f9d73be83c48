"""The engine's record of one request: its tokens so far, how many of them the cache holds, its
slot and where it is in its life (waiting → running → finished)."""

from __future__ import annotations

import enum

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.sampling import SamplingParams
from engine.structured_output import GrammarState


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = params
        self.output_token_ids: list[int] = []
        self.output_logprobs: list[float] = []
        self.status = SequenceStatus.WAITING
        self.slot: int | None = None
        # Tokens whose keys/values (or DeltaNet state) are in the slot; the newest sampled token
        # is not among them until the next step feeds it.
        self.num_computed_tokens = 0
        # Prefix caching (engine/prefix_cache.py): the chained hashes of its full blocks so far,
        # how many of its table's blocks are registered in the cache, and the tokens its latest
        # admission found cached.
        self.block_hashes: list[bytes] = []
        self.num_registered_blocks = 0
        self.num_cached_tokens = 0
        # Speculative decoding: draft tokens for the next step to verify (engine/spec_decode.py);
        # never part of the output until accepted.
        self.draft_token_ids: list[int] = []
        self.finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
        self.error: str | None = None  # why it failed, with finish_reason "error"
        self.generator: torch.Generator | None = None  # made on first draw, on the logits' device
        self.detokenizer: IncrementalDetokenizer | None = None  # when the engine has a tokenizer
        self.grammar: GrammarState | None = None  # with params.structured_outputs, once compiled
        # With params.prompt_logprobs: entry j scores prompt token j (None for the first token).
        self.prompt_logprobs: list[float | None] = [None]
        self.prompt_top_logprobs: list[tuple[tuple[int, float], ...]] = [()]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_prefilling(self) -> bool:
        return self.num_computed_tokens < self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def token_slice(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output."""
        p = self.num_prompt_tokens
        if end <= p:
            return self.prompt_token_ids[start:end]
        if start >= p:
            return self.output_token_ids[start - p:end - p]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - p]

    def append(self, token_id: int, logprob: float) -> None:
        self.output_token_ids.append(token_id)
        self.output_logprobs.append(logprob)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, slot={self.slot}, "
                f"prompt={self.num_prompt_tokens}, out={self.num_output_tokens}, "
                f"computed={self.num_computed_tokens})")
