"""The executors' drafter for speculative decoding: the checkpoint's MTP layer (model/mtp.py) with
its own paged KV cache (the target's block tables), fed with each step's final hidden states.
`propose` cuts the step to its accepted tokens, runs the MTP over them and drafts; it returns the
DeltaNet rollbacks the executor must apply: (slot, new tokens kept) for each sequence whose verify
chunk had rejected drafts. The local executor applies them at once, the cluster executor with the
next step (its DeltaNet actors hold the per-position states)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from model.batch import BatchLayout
from model.config import ModelConfig
from model.loading import load_module, materialize
from model.mtp import MTPProposer, MultiTokenPredictor
from model.weights import CheckpointReader


class _Head(nn.Module):
    """What the MTP proposer reads of the target (embedding, LM head), for an executor that holds
    no whole model in this process (the cluster executor's driver)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()


def head_only(model_dir: str | Path, config: ModelConfig, device: torch.device | str = "cpu") -> nn.Module:
    """The target's embedding and LM head alone (tied where the checkpoint ties them)."""
    with torch.device("meta"):
        head = _Head(config)
    materialize(head, device, config.torch_dtype)
    reader = CheckpointReader(model_dir)
    load_module(head.model.embed_tokens, reader, prefix="model.embed_tokens.")
    if config.tie_word_embeddings:
        head.lm_head.weight = head.model.embed_tokens.weight
    else:
        load_module(head.lm_head, reader, prefix="lm_head.")
    reader.close()
    return head.eval()


class Drafter:
    def __init__(self, lm: nn.Module, model_dir: str | Path, k: int, sizes: tuple[int, int, int, int],
                 device: torch.device) -> None:
        """`lm`: the target (CausalLM) or its head (`head_only`); `sizes`: num_slots, max_model_len,
        block_size, num_kv_blocks of the target's caches. Refuses a checkpoint without an MTP layer,
        naming engine.speculative_tokens."""
        try:
            mtp = MultiTokenPredictor.from_pretrained(model_dir, lm.config, device=device)
        except (ValueError, OSError) as e:  # CheckpointError is a ValueError
            raise ValueError(f"engine.speculative_tokens={k} needs the checkpoint's MTP layer: {e}") from None
        self.proposer = MTPProposer(lm, mtp)  # type: ignore[arg-type]
        self.cache = self.proposer.make_cache(*sizes)
        self.k, self.device = k, device
        self._last: tuple[BatchLayout, Tensor, Tensor] | None = None

    def record(self, layout: BatchLayout, token_ids: Tensor, hidden: Tensor) -> None:
        """The step just executed: its layout, tokens [T] and final-normed hidden states [T, H]."""
        self._last = (layout, token_ids, hidden)

    def forget(self) -> None:
        self._last = None

    @torch.inference_mode()
    def propose(self, accepted: Sequence[int], next_token_ids: Sequence[int], num_drafts: Sequence[int],
                ) -> tuple[list[list[int]], list[tuple[int, int]]]:
        """Executor.propose's drafts, and the (slot, tokens kept) DeltaNet rollbacks."""
        if self._last is None:
            raise RuntimeError("propose needs a step executed before it")
        layout, token_ids, hidden = self._last
        self._last = None
        lengths = layout.lengths.tolist()
        if not (len(accepted) == len(next_token_ids) == len(num_drafts) == len(lengths)):
            raise ValueError(f"accepted, next_token_ids and num_drafts need one entry per sequence of the "
                             f"step ({len(lengths)})")
        if any(not 0 <= a <= n for a, n in zip(accepted, lengths, strict=True)):
            raise ValueError(f"accepted {list(accepted)} outside 0..lengths {lengths}")
        if any(not 0 <= d <= self.k for d in num_drafts):
            raise ValueError(f"num_drafts {list(num_drafts)} outside 0..{self.k}")
        slots = layout.slots.tolist()
        rollbacks = [(slots[b], a) for b, (a, n) in enumerate(zip(accepted, lengths, strict=True))
                     if 0 < a < n]
        # The MTP over the accepted tokens (filling its cache), then the drafts.
        live = [b for b, a in enumerate(accepted) if a > 0]
        drafts: list[list[int]] = [[] for _ in lengths]
        if not live:
            return drafts, rollbacks
        offsets = [0]
        for n in lengths[:-1]:
            offsets.append(offsets[-1] + n)
        dev = self.device
        keep = torch.cat([torch.arange(offsets[b], offsets[b] + accepted[b]) for b in live]).to(dev)
        tables = None if layout.block_tables is None else layout.block_tables.tolist()
        cut = BatchLayout.build([slots[b] for b in live], [int(layout.starts[b]) for b in live],
                                [accepted[b] for b in live], dev,
                                None if tables is None else [[x for x in tables[b] if x >= 0] for b in live])
        ids = token_ids.to(dev)[keep]
        next_ids = torch.roll(ids, -1)
        next_ids[cut.last_token_index()] = torch.tensor([next_token_ids[b] for b in live], dtype=torch.long,
                                                        device=dev)
        out = self.proposer.step(next_ids, hidden.to(dev)[keep], cut, self.cache)
        for k in sorted({num_drafts[b] for b in live} - {0}):
            group = [i for i, b in enumerate(live) if num_drafts[b] == k]
            ids_k, _ = self.proposer.draft(out, cut, self.cache, k, torch.tensor(group, dtype=torch.long,
                                                                                 device=dev))
            for i, row in zip(group, ids_k.tolist(), strict=True):
                drafts[live[i]] = row
        return drafts, rollbacks
