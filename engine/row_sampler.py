"""A step's logits rows to tokens, one request failing alone: sampling the rows that reach a
sequence's newest token (structured outputs' masks applied, grammars advanced) and verifying
speculative decoding's drafts. Batched first; if the batch raises, row by row, so only the
requests whose row raises fail, their seeded generators restarted where the step found them."""

from __future__ import annotations

import logging

import torch

from engine.output_processor import Sampled
from engine.sampling import Sampler
from engine.scheduler import ScheduledChunk
from engine.sequence import Sequence
from engine.spec_decode import verify
from engine.structured_output import StructuredOutputManager, TokenMask

log = logging.getLogger(__name__)
Verified = tuple[list[int], list[float]] | Exception  # emitted tokens and their logprobs, or why not


def generator(seq: Sequence, device: torch.device) -> torch.Generator | None:
    """The sequence's random generator (seeded or not), made on first use; None when greedy."""
    if seq.generator is None and not seq.params.greedy:
        seq.generator = seq.params.make_generator(device)
    return seq.generator


def sample(sampler: Sampler, seqs: list[Sequence], logits: torch.Tensor,
                structured: StructuredOutputManager | None) -> list[Sampled]:
    """Each row's (token, logprob), or the exception that failed the row's request."""
    generators: list[torch.Generator | None] = []
    states: list[torch.Tensor] = []
    mask, mask_failed = None, {}
    if structured is not None:
        mask, mask_failed = structured.masks([s.grammar for s in seqs])
    try:
        for seq in seqs:
            generators.append(g := generator(seq, logits.device))
            if g is not None:
                states.append(g.get_state())
        # token_mask only where a row has a grammar: a sampler without structured outputs
        # (a test's, another backend's) keeps its plain signature.
        masked = {"token_mask": mask} if mask is not None else {}
        out = sampler(logits, [s.params for s in seqs], generators, seqs, **masked)
        sampled = list(zip(out.token_ids.tolist(), out.logprobs.tolist(), strict=True))
        return _advance_grammars(seqs, sampled, mask_failed)
    except Exception:
        log.exception("sampling %d rows failed; sampling them one by one", len(seqs))
    for g, state in zip([g for g in generators if g is not None], states, strict=False):
        g.set_state(state)
    sampled: list[Sampled] = []
    for i, seq in enumerate(seqs):
        try:
            row_mask = None
            if mask is not None and i in mask.rows:
                j = mask.rows.index(i)
                row_mask = TokenMask(rows=(0,), bitmask=mask.bitmask[j:j + 1])
            gen = generator(seq, logits.device)
            out = sampler(logits[i:i + 1], [seq.params], [gen], [seq],
                          **({"token_mask": row_mask} if row_mask is not None else {}))
            sampled.append((int(out.token_ids[0]), float(out.logprobs[0])))
        except Exception as e:
            log.warning("request %s: sampling failed: %s: %s", seq.request_id, type(e).__name__, e)
            sampled.append(e)
    return _advance_grammars(seqs, sampled, mask_failed)


def verify_drafts(sampler: Sampler, chunks: list[ScheduledChunk], rows: list[torch.Tensor]) -> list[Verified]:
    """engine/spec_decode.py over the verify chunks (rows[i]: chunk i's num_drafts + 1 logits rows)."""
    seqs = [c.seq for c in chunks]
    drafts = [c.seq.draft_token_ids[:c.num_drafts] for c in chunks]
    generators = [generator(s, rows[0].device) for s in seqs]
    states = [g.get_state() if g is not None else None for g in generators]
    try:
        return list(verify(sampler, torch.cat(rows), [s.params for s in seqs], seqs, drafts, generators))
    except Exception:
        log.exception("verifying %d sequences' drafts failed; verifying them one by one", len(seqs))
    results: list[Verified] = []
    for seq, r, d, g, state in zip(seqs, rows, drafts, generators, states, strict=True):
        if g is not None and state is not None:
            g.set_state(state)
        try:
            results.append(verify(sampler, r, [seq.params], [seq], [d], [g])[0])
        except Exception as e:
            log.warning("request %s: verifying drafts failed: %s: %s", seq.request_id, type(e).__name__, e)
            results.append(e)
    return results


def _advance_grammars(seqs: list[Sequence], sampled: list[Sampled],
                      mask_failed: dict[int, Exception]) -> list[Sampled]:
    """Each grammar takes its row's token; a row whose mask could not be built, or whose token its
    grammar refuses (never, with the mask applied), fails its request alone."""
    for i, seq in enumerate(seqs):
        s = sampled[i]
        if seq.grammar is None or isinstance(s, Exception):
            continue
        if i in mask_failed:
            e = mask_failed[i]
            sampled[i] = RuntimeError(f"the grammar mask failed: {type(e).__name__}: {e}")
        elif not seq.grammar.accept(s[0]):
            sampled[i] = RuntimeError(f"token {s[0]} is not allowed by the request's grammar")
    return sampled
