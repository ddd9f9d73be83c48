"""Speculative decoding's verification: which of a sequence's draft tokens the target model's
logits accept, and the token that follows them.

A verify step runs a sequence's last token and its m drafts d_1..d_m as one chunk, which gives m + 1
rows of target logits: row j scores the token after d_j (row 0: after the last real token). Row j is
adjusted (logit_bias, min_tokens, penalties) as if d_1..d_j had already been appended, exactly as
the step without speculation that would have produced that token (vLLM does the same).
- greedy: accept d_{j+1} while it equals row j's argmax; the first mismatch's argmax (or row m's,
  the bonus token, when all are accepted) follows. The tokens are those of decoding one at a time.
- sampling: rejection sampling (Leviathan et al. 2023; Chen et al. 2023): accept d_{j+1} with
  probability min(1, p_j(d) / q_j(d)); on rejection draw from norm(max(0, p_j - q_j)); when all are
  accepted, draw the bonus token from p_m. Every emitted token is then distributed as p, the
  target's (filtered: temperature, min_p, top-k, top-p) distribution. The MTP drafts greedily, so
  q_j is one-hot at d_{j+1}: accept with probability p_j(d), on rejection draw from p_j without d.

Legend: R logit rows, V vocabulary, m drafts of one sequence."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from engine.sampling import History, Sampler, SamplingParams, TokenHistory, draw, filtered_probs
from engine.scheduler import ScheduledChunk
from engine.sequence import SequenceStatus


def rejection_sample(target_probs: Tensor, draft_probs: Tensor, draft_ids: Sequence[int],
                     generator: torch.Generator | None) -> list[int]:
    """target_probs [m+1, V], draft_probs [m, V] (the distributions the drafts were drawn from),
    draft_ids [m] -> the emitted tokens: the accepted drafts and one more (1..m+1 tokens)."""
    m = len(draft_ids)
    if target_probs.shape[0] != m + 1 or draft_probs.shape[0] != m:
        raise ValueError(f"{m} drafts need {m + 1} target rows and {m} draft rows, got "
                         f"{target_probs.shape[0]} and {draft_probs.shape[0]}")
    out: list[int] = []
    for j, d in enumerate(draft_ids):
        p, q = float(target_probs[j, d]), float(draft_probs[j, d])
        u = float(torch.rand((), generator=generator, device=target_probs.device))
        if q > 0 and u * q < p:  # u < p / q: accepted with probability min(1, p / q)
            out.append(d)
            continue
        residual = (target_probs[j] - draft_probs[j]).clamp_min(0)
        total = residual.sum()
        # A zero residual means p <= q everywhere, so p = q and the draft is always accepted; the
        # guard keeps rounding from dividing by zero.
        residual = residual / total if float(total) > 0 else target_probs[j]
        out.append(int(draw(residual, generator)))
        return out
    out.append(int(draw(target_probs[m], generator)))
    return out


def verify(sampler: Sampler, raw: Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory],
           drafts: Sequence[Sequence[int]], generators: Sequence[torch.Generator | None],
           ) -> list[tuple[list[int], list[float]]]:
    """raw [R, V] float32 target logits: sequence i's len(drafts[i]) + 1 rows, in order, one
    sequence after another -> per sequence the emitted tokens and their logprobs (of the raw
    distribution, as without speculation)."""
    if raw.shape[0] != sum(len(d) + 1 for d in drafts):
        raise ValueError(f"{raw.shape[0]} logit rows for drafts of lengths {[len(d) for d in drafts]}")
    row_params: list[SamplingParams] = []
    row_hist: list[TokenHistory] = []
    for p, h, d in zip(params, histories, drafts, strict=True):
        out = list(h.output_token_ids)
        for j in range(len(d) + 1):
            row_params.append(p)
            row_hist.append(History(h.prompt_token_ids, out + list(d[:j])))
    logits = sampler.adjusted_logits(raw, row_params, row_hist)  # [R, V]
    argmax = logits.argmax(-1).tolist()
    sampled_rows = [r for r, p in enumerate(row_params) if not p.greedy]
    probs = None
    if sampled_rows:
        probs = filtered_probs(logits[sampled_rows], [row_params[r] for r in sampled_rows])
    prob_row = {r: i for i, r in enumerate(sampled_rows)}
    logp = torch.log_softmax(raw, -1)
    results = []
    first = 0
    for p, d, g in zip(params, drafts, generators, strict=True):
        m = len(d)
        if p.greedy:
            tokens = []
            for j in range(m + 1):
                tokens.append(argmax[first + j])
                if j == m or argmax[first + j] != d[j]:
                    break
        else:
            assert probs is not None
            target = probs[prob_row[first]:prob_row[first] + m + 1]
            one_hot = torch.zeros(m, target.shape[1], dtype=target.dtype, device=target.device)
            one_hot.scatter_(1, torch.tensor(list(d), dtype=torch.long, device=raw.device)[:, None], 1.0)
            tokens = rejection_sample(target, one_hot, d, g)
        rows = torch.arange(first, first + len(tokens), device=raw.device)
        lps = logp[rows, torch.tensor(tokens, dtype=torch.long, device=raw.device)].tolist()
        results.append((tokens, lps))
        first += m + 1
    return results


def plan_drafts(chunks: Sequence[ScheduledChunk], emitted: Mapping[Any, int], k: int, max_seq_len: int,
                ) -> tuple[list[int], list[int], list[int]]:
    """After a step: per chunk the tokens its sequence took into its cache (a verify chunk: its
    real token + the accepted drafts, `emitted` - 1 of them), the token that follows them, and how
    many drafts to propose next (k at most). A sequence drafts only where its next step could use
    them all: below max_tokens and the longest sequence; one with structured outputs not at all
    (its grammar would have to accept and roll back every draft); one that finished, nothing."""
    accepted, next_ids, num_drafts = [], [], []
    for c in chunks:
        seq = c.seq
        if seq.status is not SequenceStatus.RUNNING:  # finished (or failed) this step
            accepted.append(0)
            next_ids.append(0)
            num_drafts.append(0)
            continue
        accepted.append(c.num_tokens + (emitted.get(seq, 1) - 1 if c.num_drafts else 0))
        end = c.start + accepted[-1]
        next_ids.append(seq.token_slice(end, end + 1)[0])
        if end == seq.num_tokens - 1 and seq.grammar is None:  # it took a new token this step
            left = seq.params.max_tokens - seq.num_output_tokens - 1
            num_drafts.append(max(0, min(k, left, max_seq_len - seq.num_tokens)))
        else:
            num_drafts.append(0)
    return accepted, next_ids, num_drafts
