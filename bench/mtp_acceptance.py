"""Acceptance of the MTP layer's drafts (model/mtp.py) on held-out text: how often a draft equals the
token the target model itself picks greedily there, the quantity that decides what speculative
decoding with k drafts is worth.

- teacher-forced: along held-out docstrings, the MTP's draft at position i (from the target's
  hidden state at i and the text's token i+1) against the target's greedy token at i+1.
- greedy generation: the target continues each held-out prompt greedily; at every step the MTP
  drafts k tokens (the first from the target's hidden state and the token just chosen, the next
  ones chained on its own output, as model/mtp.py's proposer does) and draft j counts as accepted
  when it and every draft before it equal the target's own next tokens (vLLM's per-position
  acceptance rate). The mean accepted length per step is what k drafts save.

    PYTHONPATH=$PWD .venv/bin/python -m bench.mtp_acceptance [--model models/tiny-qwen3-next] [-k 3]

The held-out docstrings are the ones scripts/train_tiny_model.py kept out of training
(training/heldout.txt in the checkpoint)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer

from model.batch import BatchLayout
from model.decoder import CausalLM
from model.mtp import MTPProposer

ROOT = Path(__file__).resolve().parents[1]


def teacher_forced_acceptance(lm: CausalLM, proposer: MTPProposer, docs: Sequence[Sequence[int]]
                              ) -> tuple[int, int]:
    """(accepted, drafted) over every position i of every doc with an i+2 in it."""
    accepted = total = 0
    for ids in docs:
        if len(ids) < 3:
            continue
        x = torch.tensor(ids)
        n = len(x)
        layout = BatchLayout.build([0], [0], [n - 1])
        hidden = lm(x[:-1], layout, lm.make_caches(1, n))  # [n-1, H]
        greedy = lm.compute_logits(hidden).argmax(-1)  # target's pick for i+1, given x[..i]
        draft = lm.compute_logits(proposer.step(x[1:], hidden, layout, proposer.make_cache(1, n))).argmax(-1)
        # the draft at i is for position i+2; the target's greedy at i+2 is greedy[i+1]
        accepted += int((draft[:-1] == greedy[1:]).sum())
        total += n - 2
    return accepted, total


def generation_acceptance(lm: CausalLM, proposer: MTPProposer, prompts: Sequence[Sequence[int]],
                          new_tokens: int, k: int) -> tuple[list[int], int]:
    """([accepted at draft position j, for j < k], number of draft steps) over greedy continuations."""
    accepted = [0] * k
    steps = 0
    for prompt in prompts:
        P = len(prompt)
        max_len = P + new_tokens + k + 1
        caches, mtp_cache = lm.make_caches(1, max_len), proposer.make_cache(1, max_len)
        # The target's greedy continuation, with its hidden state at every position.
        tokens, hidden = list(prompt), []
        layout = BatchLayout.build([0], [0], [P])
        h = lm(torch.tensor(tokens), layout, caches)
        hidden.extend(h)
        for _ in range(new_tokens):
            tokens.append(int(lm.compute_logits(h[-1:]).argmax()))
            h = lm(torch.tensor(tokens[-1:]), BatchLayout.build([0], [len(tokens) - 1], [1]), caches)
            hidden.extend(h)
        # The MTP walks the same sequence as an engine would: the prompt in one pass, then one
        # position per step, each step drafting k tokens past the one just chosen.
        start, length = 0, P
        while start + length + k < len(tokens):
            end = start + length  # tokens[end] was just chosen by the target
            layout = BatchLayout.build([0], [start], [length])
            next_ids = torch.tensor(tokens[start + 1:end + 1])
            drafts, _ = proposer.propose(torch.stack(hidden[start:end]), next_ids, layout, mtp_cache, k)
            steps += 1
            for j in range(k):
                if int(drafts[0, j]) != tokens[end + 1 + j]:
                    break
                accepted[j] += 1
            start, length = end, 1
    return accepted, steps


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(ROOT / "models" / "tiny-qwen3-next"))
    ap.add_argument("--docs", type=int, default=128, help="held-out docstrings to score (teacher-forced)")
    ap.add_argument("--prompts", type=int, default=32, help="held-out prompts to continue greedily")
    ap.add_argument("--prompt-len", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("-k", type=int, default=3, help="drafts per step")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.model)
    heldout = path / "training" / "heldout.txt"
    if not heldout.is_file():
        print(f"mtp_acceptance: {heldout} not found (the held-out text scripts/train_tiny_model.py writes)",
              file=sys.stderr)
        return 2
    lm = CausalLM.from_pretrained(path, dtype="float32")
    proposer = MTPProposer.from_pretrained(lm, path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    docs = [tok.encode(d).ids for d in heldout.read_text().split("<|endoftext|>\n") if d.strip()]

    t0 = time.perf_counter()
    acc, total = teacher_forced_acceptance(lm, proposer, docs[: args.docs])
    print(f"teacher-forced, {min(args.docs, len(docs))} held-out docstrings: first-draft acceptance "
          f"{acc / total:.3f} ({acc}/{total})")
    prompts = [d[: args.prompt_len] for d in docs if len(d) >= args.prompt_len][: args.prompts]
    accepted, steps = generation_acceptance(lm, proposer, prompts, args.new_tokens, args.k)
    rates = [a / steps for a in accepted]
    print(f"greedy generation, {len(prompts)} held-out prompts x {args.new_tokens} tokens, {steps} steps: "
          f"acceptance per draft position {' '.join(f'{r:.3f}' for r in rates)} "
          f"(first draft {rates[0]:.3f}); mean accepted drafts per step with k=1..{args.k}: "
          + " ".join(f"{sum(rates[:j]):.2f}" for j in range(1, args.k + 1)))
    print(f"({time.perf_counter() - t0:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
