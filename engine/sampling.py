"""Sampling parameters of a request and the sampler that turns a step's logits into tokens.

Legend: B rows (sequences that sample this step), V vocabulary."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from engine.structured_output import StructuredOutputsParams, TokenMask, apply_token_mask


class SamplingParamsError(ValueError):
    """An invalid sampling parameter; `field` names it so a CLI or HTTP layer can point at it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


MAX_TOP_LOGPROBS = 20  # as OpenAI's API
MAX_FLOAT32 = torch.finfo(torch.float32).max


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None  # None: torch's global generator
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: bool = False  # report the logprob of each chosen token
    top_logprobs: int = 0  # with logprobs: also the n likeliest tokens of each step
    prompt_logprobs: int | None = None  # None: off; n >= 0: each prompt token's logprob and top n
    stop: tuple[str, ...] = ()  # stop strings; the output text ends before the first match
    # Output held to a JSON schema / regex / choice / grammar (engine/structured_output.py).
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        # Lists are welcome from callers; a frozen params object keeps a tuple.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str) else tuple(self.stop))
        _require(_is_int(self.max_tokens) and self.max_tokens >= 1, "max_tokens", "must be >= 1",
                 self.max_tokens)
        # Every value that reaches a tensor is bounded here, so no request can overflow a batched
        # tensor op and fail its neighbours' step: temperature and top_p become float32, top_k is
        # cut to the vocabulary by the sampler (larger means "all"), the seed seeds a
        # torch.Generator, which takes 64 bits, and token ids must fit int64.
        _require(_is_number(self.temperature) and self.temperature >= 0, "temperature", "must be >= 0",
                 self.temperature)
        _require(self.temperature <= MAX_FLOAT32, "temperature",
                 f"must be at most {MAX_FLOAT32:.4g} (float32)", self.temperature)
        _require(_is_number(self.top_p) and 0 < self.top_p <= 1, "top_p", "must be in (0, 1]", self.top_p)
        _require(_is_int(self.top_k) and self.top_k >= -1, "top_k", "must be -1, 0 (off) or >= 1",
                 self.top_k)
        _require(self.seed is None or _is_int(self.seed), "seed", "must be an integer", self.seed)
        _require(self.seed is None or -(2**63) <= self.seed < 2**64, "seed", "must be in [-2**63, 2**64)",
                 self.seed)
        for t in self.stop_token_ids:
            _require(_is_int(t) and t >= 0, "stop_token_ids", "must hold token ids >= 0", t)
            _require(t < 2**63, "stop_token_ids", "must hold token ids < 2**63", t)
        for s in self.stop:
            _require(isinstance(s, str) and s != "", "stop", "must hold non-empty strings", s)
        _require(_is_int(self.top_logprobs) and 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS, "top_logprobs",
                 f"must be in [0, {MAX_TOP_LOGPROBS}]", self.top_logprobs)
        _require(self.prompt_logprobs is None or (_is_int(self.prompt_logprobs)
                                                  and 0 <= self.prompt_logprobs <= MAX_TOP_LOGPROBS),
                 "prompt_logprobs", f"must be None or in [0, {MAX_TOP_LOGPROBS}]", self.prompt_logprobs)
        so = self.structured_outputs
        _require(so is None or isinstance(so, StructuredOutputsParams), "structured_outputs",
                 "must be None or StructuredOutputsParams", so)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def make_generator(self, device: torch.device | str) -> torch.Generator | None:
        """A generator of the request's own, so its draws do not depend on its batch neighbours."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # x == x: not NaN


def _require(ok: bool, field: str, rule: str, value: Any) -> None:
    if not ok:
        raise SamplingParamsError(field, f"{field} {rule}, got {value!r}")


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: Tensor  # [B] long
    logprobs: Tensor  # [B] float32: log_softmax of the raw logits at the chosen token


class Sampler:
    """Greedy rows take the argmax; sampled rows go temperature → top-k → top-p → a draw from the
    row's own generator. Logprobs are those of the unmodified distribution, as vLLM reports."""

    def __call__(self, logits: Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None] | None = None,
                 token_mask: TokenMask | None = None) -> SamplerOutput:
        """`token_mask`: the grammar masks of structured-output rows, applied before temperature."""
        B = logits.shape[0]
        if len(params) != B:
            raise ValueError(f"{B} logit rows but {len(params)} sampling params")
        generators = generators if generators is not None else [None] * B
        raw = logits = logits.float()
        if token_mask is not None:
            logits = apply_token_mask(logits.clone(), token_mask)
        token_ids = logits.argmax(-1)  # [B]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            probs = filtered_probs(logits[rows], [params[i] for i in rows])  # [b, V]
            for j, i in enumerate(rows):
                token_ids[i] = draw(probs[j], generators[i])
        logprobs = torch.log_softmax(raw, -1).gather(1, token_ids[:, None]).squeeze(1)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)


def filtered_probs(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """[b, V] logits of sampled rows -> [b, V] probabilities after temperature, top-k and top-p."""
    V = logits.shape[-1]
    dev = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    logits = logits / temperature[:, None]
    top_k = torch.tensor([min(p.top_k, V) if p.top_k > 0 else V for p in params], device=dev)  # [b]
    top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=dev)  # [b]
    if bool((top_k < V).any()) or bool((top_p < 1).any()):
        sorted_logits, order = logits.sort(-1, descending=True)  # [b, V]
        rank = torch.arange(V, device=dev)
        sorted_logits = sorted_logits.masked_fill(rank[None, :] >= top_k[:, None], float("-inf"))
        sorted_probs = torch.softmax(sorted_logits, -1)
        # Keep the smallest head whose mass reaches top_p: drop a token once the mass before it
        # already does. Rows with top_p == 1 skip this, so rounding in cumsum cannot cut their tail.
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        drop = (mass_before >= top_p[:, None]) & (top_p < 1)[:, None]
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.empty_like(logits).scatter_(-1, order, sorted_logits)
    return torch.softmax(logits, -1)


def draw(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One token from probs [V]: argmax(p / q) with q ~ Exp(1) is a draw from p (the exponential
    race), and needs one generator call per row whatever the row's neighbours are."""
    q = torch.empty_like(probs).exponential_(generator=generator).clamp_min_(1e-20)
    return (probs / q).argmax()


def top_logprobs(logits: Tensor, token_ids: Tensor, n: int) -> tuple[Tensor, Tensor, Tensor]:
    """For logits [R, V] and the tokens [R] they were scored against: each token's logprob [R],
    and the n likeliest tokens [R, n] with their logprobs [R, n], all of the raw distribution."""
    logp = torch.log_softmax(logits.float(), -1)  # [R, V]
    chosen = logp.gather(1, token_ids[:, None]).squeeze(1)  # [R]
    top_lp, top_ids = logp.topk(min(n, logp.shape[-1]), dim=-1)  # [R, n]
    return chosen, top_ids, top_lp
