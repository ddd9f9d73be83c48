"""What a step's logits and sampled tokens mean for each request: prompt logprobs, top logprobs,
output text, stop checks, and the RequestOutput a request receives. It decides when a request is
done; the engine gives back its slot."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Set
from dataclasses import dataclass

import torch

from engine.sampling import top_logprobs
from engine.sequence import Sequence

log = logging.getLogger(__name__)
TopLogprobs = tuple[tuple[int, float], ...]  # (token id, logprob), likeliest first
PromptRow = tuple[Sequence, int, int]  # (sequence, logits row, prompt position the row scores)


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: the token it sampled and, once finished, why.
    A step that only runs part of a prompt produces none; an aborted request produces none.
    `new_text` is the output text that became final this step (engines with a tokenizer); the
    prompt's logprobs come once, with the first sampled token. A request that failed alone (its
    data broke the step) gets one last output with finish_reason "error" and `error` set."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[float, ...] | None  # None unless the request asked for logprobs
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "error" once finished
    num_prompt_tokens: int
    num_output_tokens: int  # so far, including new_token_ids
    new_text: str = ""
    new_top_logprobs: tuple[TopLogprobs, ...] | None = None  # with params.top_logprobs
    prompt_logprobs: tuple[float | None, ...] | None = None  # with params.prompt_logprobs
    prompt_top_logprobs: tuple[TopLogprobs, ...] | None = None
    error: str | None = None  # why the request failed; only with finish_reason "error"
    num_cached_tokens: int = 0  # prompt tokens the prefix cache served when the request was admitted


Sampled = tuple[int, float] | Exception  # a row's (token id, logprob), or why sampling it failed


class OutputProcessor:
    def __init__(self, eos_token_ids: Set[int], max_seq_len: int) -> None:
        """`max_seq_len`: prompt + output tokens at which a sequence ends with "length"."""
        self.eos_token_ids = frozenset(eos_token_ids)
        self.max_seq_len = max_seq_len

    def score_prompts(self, logits: torch.Tensor, rows: list[PromptRow]) -> None:
        """Record the logprob (and top n) of each prompt token that `rows` score."""
        index = torch.tensor([r for _, r, _ in rows], dtype=torch.long, device=logits.device)
        targets = torch.tensor([s.prompt_token_ids[j + 1] for s, _, j in rows], dtype=torch.long,
                               device=logits.device)
        n = max(s.params.prompt_logprobs or 0 for s, _, _ in rows)
        chosen, top_ids, top_lp = top_logprobs(logits[index], targets, max(n, 1))
        chosen, top_ids, top_lp = chosen.tolist(), top_ids.tolist(), top_lp.tolist()
        for i, (seq, _, _) in enumerate(rows):
            k = seq.params.prompt_logprobs or 0
            seq.prompt_logprobs.append(chosen[i])
            seq.prompt_top_logprobs.append(tuple(zip(top_ids[i][:k], top_lp[i][:k], strict=True)))

    def process(self, seqs: list[Sequence], logits: torch.Tensor, sampled: list[Sampled],
                ) -> list[RequestOutput]:
        """One output per sequence of `seqs`, whose rows of `logits` [len(seqs), V] the sampler
        drew `sampled` from. A row that failed, or whose text or stop check fails, fails its
        request alone."""
        tops = self._top_logprobs(seqs, logits, sampled)
        outputs = []
        for seq, s, top in zip(seqs, sampled, tops, strict=True):
            if isinstance(s, Exception):
                outputs.append(self.failed(seq, f"sampling failed: {type(s).__name__}: {s}"))
                continue
            try:
                outputs.append(self._append(seq, *s, top))
            except Exception as e:  # e.g. a token the tokenizer cannot decode
                log.exception("request %s: processing its token failed", seq.request_id)
                outputs.append(self.failed(seq, f"processing the output failed: {type(e).__name__}: {e}"))
        return outputs

    def failed(self, seq: Sequence, message: str) -> RequestOutput:
        """The last output of a request that failed alone."""
        return RequestOutput(request_id=seq.request_id, new_token_ids=(), new_logprobs=None, finished=True,
                             finish_reason="error", num_prompt_tokens=seq.num_prompt_tokens,
                             num_output_tokens=seq.num_output_tokens, error=message)

    def _append(self, seq: Sequence, token_id: int, logprob: float, top: TopLogprobs | None,
                ) -> RequestOutput:
        first = seq.num_output_tokens == 0
        seq.append(token_id, logprob)
        hit_stop_string = seq.detokenizer is not None and seq.detokenizer.add(token_id)
        reason = "stop" if hit_stop_string else self._stop_reason(seq)
        want_prompt = first and seq.params.prompt_logprobs is not None
        return RequestOutput(
            request_id=seq.request_id, new_token_ids=(token_id,),
            new_logprobs=(logprob,) if seq.params.logprobs else None, finished=reason is not None,
            finish_reason=reason, num_prompt_tokens=seq.num_prompt_tokens,
            num_output_tokens=seq.num_output_tokens,
            new_text=seq.detokenizer.take(reason is not None) if seq.detokenizer else "",
            new_top_logprobs=(top,) if top is not None else None,
            prompt_logprobs=tuple(seq.prompt_logprobs) if want_prompt else None,
            prompt_top_logprobs=tuple(seq.prompt_top_logprobs) if want_prompt else None,
            num_cached_tokens=min(seq.num_cached_tokens, seq.num_prompt_tokens))

    def _top_logprobs(self, seqs: list[Sequence], logits: torch.Tensor, sampled: list[Sampled],
                      ) -> list[TopLogprobs | None]:
        """Each row's n likeliest tokens where its request wants them and its sampling worked."""
        rows = [i for i, (seq, s) in enumerate(zip(seqs, sampled, strict=True))
                if seq.params.logprobs and not isinstance(s, Exception)]
        tops: list[TopLogprobs | None] = [None] * len(seqs)
        n = max((seqs[i].params.top_logprobs for i in rows), default=0)
        if n == 0:  # in a batch where some request wants them, the others' are empty
            return tops
        index = torch.tensor(rows, dtype=torch.long, device=logits.device)
        chosen = torch.tensor([sampled[i][0] for i in rows], dtype=torch.long, device=logits.device)
        _, top_ids, top_lp = top_logprobs(logits[index], chosen, n)
        top_ids, top_lp = top_ids.tolist(), top_lp.tolist()
        for j, i in enumerate(rows):
            k = seqs[i].params.top_logprobs
            tops[i] = tuple(zip(top_ids[j][:k], top_lp[j][:k], strict=True))
        return tops

    def _stop_reason(self, seq: Sequence) -> str | None:
        tok, p = seq.output_token_ids[-1], seq.params
        # Before min_tokens nothing but the length stops a sequence (as in vLLM); the sampler
        # masks EOS and stop ids then, and this check holds whatever the logits did.
        if seq.num_output_tokens >= p.min_tokens and (
                tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids)):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.max_seq_len:
            return "length"
        return None


def merged(first: RequestOutput, then: RequestOutput) -> RequestOutput:
    """One output for two tokens of the same request in one step (speculative decoding)."""
    cat = (lambda a, b: None if a is None or b is None else a + b)  # noqa: E731
    return dataclasses.replace(then, new_token_ids=first.new_token_ids + then.new_token_ids,
                               new_logprobs=cat(first.new_logprobs, then.new_logprobs),
                               new_text=first.new_text + then.new_text,
                               new_top_logprobs=cat(first.new_top_logprobs, then.new_top_logprobs),
                               prompt_logprobs=first.prompt_logprobs,
                               prompt_top_logprobs=first.prompt_top_logprobs)
