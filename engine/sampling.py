"""Sampling parameters of a request and the sampler that turns a step's logits into tokens.

Legend: B rows (sequences that sample this step), V vocabulary."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

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
MAX_LOGIT_BIAS = 100  # OpenAI's range: -100 bans a token, 100 all but forces it


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: off
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0  # 0: off; else drop tokens less likely than min_p x the likeliest one
    seed: int | None = None  # None: torch's global generator
    # OpenAI's penalties on the output so far: logit -= frequency x count + presence x (count > 0)
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's (CTRL's) penalty on tokens seen in prompt or output: logit / r if > 0, else logit x r
    repetition_penalty: float = 1.0
    # token id -> bias added to its logit; a mapping is welcome, a sorted tuple of pairs is kept
    logit_bias: tuple[tuple[int, float], ...] = ()
    min_tokens: int = 0  # EOS and stop_token_ids are masked (and stop strings unchecked) before
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
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
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
        _require(_is_number(self.min_p) and 0 <= self.min_p <= 1, "min_p", "must be in [0, 1]", self.min_p)
        _require(self.seed is None or _is_int(self.seed), "seed", "must be an integer", self.seed)
        _require(self.seed is None or -(2**63) <= self.seed < 2**64, "seed", "must be in [-2**63, 2**64)",
                 self.seed)
        for name in ("presence_penalty", "frequency_penalty"):  # OpenAI's range
            value = getattr(self, name)
            _require(_is_number(value) and -2 <= value <= 2, name, "must be in [-2, 2]", value)
        _require(_is_number(self.repetition_penalty) and 0 < self.repetition_penalty <= MAX_FLOAT32,
                 "repetition_penalty", "must be > 0 (1: off) and finite", self.repetition_penalty)
        for t, b in self.logit_bias:
            _require(_is_int(t) and 0 <= t < 2**63, "logit_bias", "must map token ids in [0, 2**63)", t)
            _require(_is_number(b) and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS, "logit_bias",
                     f"must map to biases in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}]", b)
        _require(_is_int(self.min_tokens) and self.min_tokens >= 0, "min_tokens", "must be >= 0",
                 self.min_tokens)
        _require(self.min_tokens <= self.max_tokens, "min_tokens",
                 f"must be at most max_tokens ({self.max_tokens})", self.min_tokens)
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

    @property
    def penalized(self) -> bool:
        """Whether the sampler needs the sequence's token history for this request."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    def make_generator(self, device: torch.device | str) -> torch.Generator | None:
        """A generator of the request's own, so its draws do not depend on its batch neighbours."""
        if self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def _bias_pairs(bias: Any) -> tuple[tuple[Any, Any], ...]:
    items = bias.items() if isinstance(bias, Mapping) else bias
    try:
        pairs = tuple((t, b) for t, b in items)
    except (TypeError, ValueError):
        raise SamplingParamsError("logit_bias", f"logit_bias must map token ids to biases, got {bias!r}"
                                  ) from None
    ids = [t for t, _ in pairs]
    if len(set(ids)) != len(ids):
        raise SamplingParamsError("logit_bias", "logit_bias names a token id twice")
    return tuple(sorted(pairs, key=lambda p: p[0])) if all(_is_int(t) for t in ids) else pairs


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


class TokenHistory(Protocol):
    """What the penalties and min_tokens read of a row's sequence (engine.sequence.Sequence)."""

    @property
    def prompt_token_ids(self) -> Sequence[int]: ...

    @property
    def output_token_ids(self) -> Sequence[int]: ...


@dataclass(frozen=True)
class History:
    """A TokenHistory of plain lists, for callers without a Sequence (tests, offline tools)."""

    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()


class Sampler:
    """The order of vLLM v1's sampler. On the raw logits: logit_bias, min_tokens (EOS and stop
    ids masked until min_tokens are out), then the repetition, frequency and presence penalties.
    Greedy rows take the argmax of that; sampled rows go on: temperature → min_p → top-k → top-p
    → a draw from the row's own generator. Logprobs are those of the raw distribution, as vLLM
    reports them by default. Every step is batched over the rows that use it; rows that use none
    cost nothing beyond a check of their params."""

    def __init__(self, eos_token_ids: Iterable[int] = ()) -> None:
        self.eos_token_ids = tuple(sorted(set(eos_token_ids)))  # masked by min_tokens unless ignore_eos

    def __call__(self, logits: Tensor, params: Sequence[SamplingParams],
                 generators: Sequence[torch.Generator | None] | None = None,
                 histories: Sequence[TokenHistory] | None = None,
                 token_mask: TokenMask | None = None) -> SamplerOutput:
        """`histories`: each row's prompt and output tokens so far; None: every row is at its
        first output token with an empty prompt (penalties then only see what is given).
        `token_mask`: the grammar masks of structured-output rows, applied after the steps on raw
        logits and before temperature, as in vLLM."""
        B = logits.shape[0]
        if len(params) != B:
            raise ValueError(f"{B} logit rows but {len(params)} sampling params")
        if histories is not None and len(histories) != B:
            raise ValueError(f"{B} logit rows but {len(histories)} token histories")
        generators = generators if generators is not None else [None] * B
        raw = logits.float()
        logits = self.adjusted_logits(raw, params, histories)
        if token_mask is not None:
            logits = apply_token_mask(logits.clone() if logits is raw else logits, token_mask)
        token_ids = logits.argmax(-1)  # [B]
        rows = [i for i, p in enumerate(params) if not p.greedy]
        if rows:
            probs = filtered_probs(logits[rows], [params[i] for i in rows])  # [b, V]
            for j, i in enumerate(rows):
                token_ids[i] = draw(probs[j], generators[i])
        logprobs = torch.log_softmax(raw, -1).gather(1, token_ids[:, None]).squeeze(1)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    def adjusted_logits(self, logits: Tensor, params: Sequence[SamplingParams],
                        histories: Sequence[TokenHistory] | None = None) -> Tensor:
        """[B, V] raw logits -> [B, V] logits after the steps that act on raw logits (a new tensor
        whenever one applies: the raw ones still give the logprobs). A step that masks tokens
        (structured outputs) belongs after these and before temperature, as in vLLM."""
        histories = histories if histories is not None else [History()] * len(params)
        bias = any(p.logit_bias for p in params)
        min_tokens = any(p.min_tokens > len(h.output_token_ids)
                         for p, h in zip(params, histories, strict=True))
        penalties = any(p.penalized for p in params)
        if not (bias or min_tokens or penalties):
            return logits
        logits = logits.clone()  # the steps below work in place
        if bias:
            apply_logit_bias(logits, params)
        if min_tokens:
            apply_min_tokens(logits, params, histories, self.eos_token_ids)
        if penalties:
            apply_penalties(logits, params, histories)
        return logits


def apply_logit_bias(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """Adds each row's biases in place. Token ids must be below V (the engine checks them
    against the model's vocabulary when the request arrives)."""
    rows = [i for i, p in enumerate(params) for _ in p.logit_bias]
    ids = [t for p in params for t, _ in p.logit_bias]
    bias = [b for p in params for _, b in p.logit_bias]
    dev = logits.device
    logits.index_put_((torch.tensor(rows, device=dev), torch.tensor(ids, device=dev)),
                      torch.tensor(bias, dtype=logits.dtype, device=dev), accumulate=True)
    return logits


def apply_min_tokens(logits: Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory],
                     eos_token_ids: Sequence[int]) -> Tensor:
    """Rows with fewer than min_tokens outputs cannot pick a token that would stop them: their
    stop_token_ids and, unless they ignore EOS, the EOS ids get -inf, in place."""
    V = logits.shape[-1]
    rows: list[int] = []
    ids: list[int] = []
    for i, (p, h) in enumerate(zip(params, histories, strict=True)):
        if p.min_tokens > len(h.output_token_ids):
            stops = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
            kept = [t for t in stops if t < V]  # an id past the logits can never be sampled anyway
            rows += [i] * len(kept)
            ids += kept
    dev = logits.device
    logits[torch.tensor(rows, dtype=torch.long, device=dev),
           torch.tensor(ids, dtype=torch.long, device=dev)] = float("-inf")
    return logits


def flat_tokens(token_lists: Sequence[Sequence[int]], rows: Sequence[int], V: int, device: torch.device,
                unique: bool = False) -> tuple[Tensor, Tensor]:
    """(row, token id) of every token of each list, as two [N] long tensors: list j's tokens
    belong to batch row rows[j]; with `unique`, each pair once. Built afresh each step from the
    sequences' lists (as vLLM does), so it is right after a preemption or a recompute, and it
    costs O(tokens), not O(rows x V). Ids outside [0, V) are left out."""
    ids = torch.tensor([t for ts in token_lists for t in ts], dtype=torch.long, device=device)
    row = torch.repeat_interleave(torch.tensor(list(rows), dtype=torch.long, device=device),
                                  torch.tensor([len(ts) for ts in token_lists], device=device))
    keep = (ids >= 0) & (ids < V)
    ids, row = ids[keep], row[keep]
    if unique and ids.numel():
        key = torch.unique(row * V + ids)
        row, ids = key // V, key % V
    return row, ids


def apply_penalties(logits: Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory],
                    ) -> Tensor:
    """vLLM's penalties, in place, touching only the tokens seen: the repetition penalty on each
    token of the prompt or the output (divide a positive logit, multiply a negative one), then
    OpenAI's frequency penalty once per output occurrence and presence penalty once per
    distinct output token."""
    V, dev = logits.shape[-1], logits.device

    def per_row(name: str) -> Tensor:  # [B]
        return torch.tensor([getattr(p, name) for p in params], dtype=torch.float32, device=dev)

    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1]
    if rep_rows:
        seen = [[*histories[i].prompt_token_ids, *histories[i].output_token_ids] for i in rep_rows]
        row, ids = flat_tokens(seen, rep_rows, V, dev, unique=True)
        penalty = per_row("repetition_penalty")[row]
        values = logits[row, ids]
        logits[row, ids] = torch.where(values > 0, values / penalty, values * penalty)
    rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0]
    if rows:
        outputs = [histories[i].output_token_ids for i in rows]
        row, ids = flat_tokens(outputs, rows, V, dev)
        logits.index_put_((row, ids), -per_row("frequency_penalty")[row], accumulate=True)
        row, ids = flat_tokens(outputs, rows, V, dev, unique=True)
        logits.index_put_((row, ids), -per_row("presence_penalty")[row], accumulate=True)
    return logits


def filtered_probs(logits: Tensor, params: Sequence[SamplingParams]) -> Tensor:
    """[b, V] logits of sampled rows -> [b, V] probabilities after temperature, min_p, top-k and
    top-p (vLLM's order: min_p's threshold is relative to the likeliest token after temperature)."""
    V = logits.shape[-1]
    dev = logits.device
    temperature = torch.tensor([p.temperature for p in params], dtype=torch.float32, device=dev)
    logits = logits / temperature[:, None]
    min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=dev)  # [b]
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, -1)
        threshold = probs.amax(-1, keepdim=True) * min_p[:, None]  # 0 for rows without min_p
        logits = logits.masked_fill(probs < threshold, float("-inf"))
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
