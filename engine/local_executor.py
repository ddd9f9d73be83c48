"""The `local` executor: the whole model in this process, with one cache per layer (a paged KV
cache, or DeltaNet state for every slot). The reference the cluster executor is checked against.
With `compile`, decode steps run through model/compiled.py's compiled layers, other steps eagerly.
For prefix caching it keeps a pool of saved DeltaNet states per DeltaNet layer, which steps save
into and load from (engine/prefix_cache.py decides). With `speculative_tokens` k > 0 it loads the
checkpoint's MTP layer (model/mtp.py) and drafts up to k tokens per sequence after each step;
verify steps keep the DeltaNet state after each of their tokens, and `propose` rolls the state
back to the last accepted one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from engine.executor import DEFAULT_PREFIX_CACHE_STATES, Executor, StepInput
from model.batch import BatchLayout
from model.cache import DeltaNetState, StateSnapshots
from model.compiled import CompiledDecode, make_decode_caches
from model.config import ModelConfig
from model.decoder import CausalLM
from model.gate_tap import GateTap
from model.moe import SparseMoeBlock
from model.mtp import MTPProposer


class LocalExecutor(Executor):
    supports_prefix_caching = True

    def __init__(self, model_dir: str | Path, dtype: str | None = None, num_slots: int = 8,
                 max_model_len: int | None = None, device: torch.device | str = "cpu",
                 block_size: int = 16, num_kv_blocks: int | None = None, compile: bool = False,
                 num_state_snapshots: int = DEFAULT_PREFIX_CACHE_STATES, speculative_tokens: int = 0) -> None:
        """`compile`: decode steps through torch.compile'd layers, compiled on the first step of each
        batch bucket (model/compiled.py). `num_state_snapshots`: saved DeltaNet states for prefix
        caching (0: none, so a hybrid model's prefixes are never reused). `speculative_tokens`: draft
        tokens per step from the checkpoint's MTP layer (0: no speculative decoding)."""
        if speculative_tokens < 0:
            raise ValueError(f"engine.speculative_tokens must be >= 0, got {speculative_tokens}")
        super().__init__(ModelConfig.from_dir(model_dir, dtype=dtype), num_slots, max_model_len, block_size,
                         num_kv_blocks, num_state_snapshots)
        self.model = CausalLM.from_pretrained(model_dir, dtype=dtype, device=device)
        self.device = torch.device(device)
        # The gate's routing result, read at its boundary for expert-load metrics.
        gates = {i: layer.mlp.gate for i, layer in enumerate(self.model.model.layers)
                 if isinstance(layer.mlp, SparseMoeBlock)}
        self.gate_tap = GateTap(gates, self.config.num_experts)
        sizes = (num_slots, self.max_model_len, block_size, self.num_kv_blocks)
        self.decode: CompiledDecode | None = None
        if compile:
            self.caches = make_decode_caches(self.model, *sizes)
            self.decode = CompiledDecode(self.model, self.caches, num_slots, self.num_kv_blocks,
                                         record_gate=self.gate_tap.record)
        else:
            self.caches = self.model.make_caches(*sizes)
        self.snapshots = [StateSnapshots(c, self.num_state_snapshots) for c in self.caches
                          if isinstance(c, DeltaNetState)] if self.num_state_snapshots else []
        self.speculative_tokens = speculative_tokens
        self.proposer: MTPProposer | None = None
        if speculative_tokens:
            try:
                self.proposer = MTPProposer.from_pretrained(self.model, model_dir)
            except (ValueError, OSError) as e:  # CheckpointError is a ValueError
                raise ValueError(f"engine.speculative_tokens={speculative_tokens} needs the checkpoint's MTP "
                                 f"layer: {e}") from None
            self.mtp_cache = self.proposer.make_cache(*sizes)
        # The last step's layout, tokens and hidden states, which `propose` drafts from.
        self._last: tuple[BatchLayout, Tensor, Tensor] | None = None

    @property
    def snapshot_bytes(self) -> int:
        """Memory the saved DeltaNet states take."""
        return sum(s.nbytes for s in self.snapshots)

    def execute(self, step: StepInput) -> Tensor:
        self.check_step(step)
        layout = BatchLayout.build(list(step.slots), list(step.starts), list(step.lengths), self.device,
                                   step.block_tables, keep_states=step.keep_states)
        if step.state_saves or step.state_loads:
            for pool in self.snapshots:
                pool.apply(step.state_saves, step.state_loads)
        token_ids = torch.tensor(step.token_ids, dtype=torch.long, device=self.device)  # [T]
        if self.decode is not None and self.decode.supports(layout):
            hidden = self.decode(token_ids, layout)  # [T, H]
        else:
            hidden = self.model(token_ids, layout, self.caches)  # [T, H]
        if self.proposer is not None:
            self._last = (layout, token_ids, hidden)
        index = torch.tensor(step.logits_index, dtype=torch.long, device=self.device)  # [R]
        return self.model.compute_logits(hidden[index])  # [R, V] float32

    @torch.inference_mode()
    def propose(self, accepted: Sequence[int], next_token_ids: Sequence[int], num_drafts: Sequence[int],
                ) -> list[list[int]]:
        if self.proposer is None or self._last is None:
            raise RuntimeError("propose needs speculative_tokens > 0 and a step executed before it")
        layout, token_ids, hidden = self._last
        self._last = None
        lengths = layout.lengths.tolist()
        if not (len(accepted) == len(next_token_ids) == len(num_drafts) == len(lengths)):
            raise ValueError(f"accepted, next_token_ids and num_drafts need one entry per sequence of the "
                             f"step ({len(lengths)})")
        if any(not 0 <= a <= n for a, n in zip(accepted, lengths, strict=True)):
            raise ValueError(f"accepted {list(accepted)} outside 0..lengths {lengths}")
        if any(not 0 <= d <= self.speculative_tokens for d in num_drafts):
            raise ValueError(f"num_drafts {list(num_drafts)} outside 0..{self.speculative_tokens}")
        # Roll the DeltaNet states of sequences with rejected drafts back to their last accepted token.
        back = [b for b, (a, n) in enumerate(zip(accepted, lengths, strict=True)) if 0 < a < n]
        if back:
            rows = torch.tensor(back, dtype=torch.long, device=self.device)
            kept = torch.tensor([accepted[b] for b in back], dtype=torch.long, device=self.device)
            for cache in self.caches:
                if isinstance(cache, DeltaNetState):
                    cache.rollback(rows, kept)
        for cache in self.caches:
            if isinstance(cache, DeltaNetState):
                cache.kept = None
        # The MTP over the accepted tokens (filling its cache), then the drafts.
        live = [b for b, a in enumerate(accepted) if a > 0]
        drafts: list[list[int]] = [[] for _ in lengths]
        if not live:
            return drafts
        offsets = (layout.starts.new_tensor([0, *lengths[:-1]]).cumsum(0)).tolist()
        keep = torch.cat([torch.arange(offsets[b], offsets[b] + accepted[b]) for b in live]).to(self.device)
        rows_t = torch.tensor(live, dtype=torch.long, device=self.device)
        cut = BatchLayout.build([int(s) for s in layout.slots[rows_t].tolist()],
                                [int(s) for s in layout.starts[rows_t].tolist()], [accepted[b] for b in live],
                                self.device, None if layout.block_tables is None
                                else [[x for x in t if x >= 0] for t in layout.block_tables[rows_t].tolist()])
        ids = token_ids[keep]
        nxt = torch.tensor([next_token_ids[b] for b in live], dtype=torch.long, device=self.device)
        next_ids = torch.roll(ids, -1)
        next_ids[cut.last_token_index()] = nxt
        out = self.proposer.step(next_ids, hidden[keep], cut, self.mtp_cache)
        for k in sorted({num_drafts[b] for b in live} - {0}):
            group = [i for i, b in enumerate(live) if num_drafts[b] == k]
            ids_k, _ = self.proposer.draft(out, cut, self.mtp_cache, k,
                                           torch.tensor(group, dtype=torch.long, device=self.device))
            for i, row in zip(group, ids_k.tolist(), strict=True):
                drafts[live[i]] = row
        return drafts

    def take_expert_counts(self) -> dict[int, list[int]]:
        return self.gate_tap.take()
