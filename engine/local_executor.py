"""The `local` executor: the whole model in this process, with one cache per layer (a paged KV
cache, or DeltaNet state for every slot). The reference the cluster executor is checked against.
With `compile`, decode steps run through model/compiled.py's compiled layers, other steps eagerly.
For prefix caching it keeps a pool of saved DeltaNet states per DeltaNet layer, which steps save
into and load from (engine/prefix_cache.py decides). With `speculative_tokens` k > 0 it loads the
checkpoint's MTP layer (model/mtp.py) and drafts up to k tokens per sequence after each step;
verify steps keep the DeltaNet state after each of their tokens, and `propose` rolls the state
back to the last accepted one. On CPU it keeps freed step memory in the process and flushes
denormals during its steps (engine/cpu_runtime.py)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from engine.cpu_runtime import flushes_denormals, keep_freed_memory
from engine.drafter import Drafter
from engine.executor import DEFAULT_PREFIX_CACHE_STATES, Executor, StepInput
from model.batch import BatchLayout
from model.cache import DeltaNetState, StateSnapshots
from model.compiled import CompiledDecode, DecodeCompileError
from model.config import ModelConfig
from model.decode_math import make_decode_caches
from model.decoder import CausalLM
from model.gate_tap import GateTap
from model.moe import SparseMoeBlock

log = logging.getLogger(__name__)


def describe_error(error: BaseException | None) -> str:
    """One line, of the innermost error: torch.compile wraps a backend's (inductor's) in its own,
    whose message runs on with advice about verbose logs."""
    while getattr(error, "inner_exception", None) is not None:  # dynamo's BackendCompilerFailed
        error = error.inner_exception  # type: ignore[union-attr]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"


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
        if self.device.type == "cpu":  # engine/cpu_runtime.py: page faults and denormals per step
            keep_freed_memory()
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
        self.drafter = Drafter(self.model, model_dir, speculative_tokens, sizes, self.device) \
            if speculative_tokens else None

    @property
    def snapshot_bytes(self) -> int:
        """Memory the saved DeltaNet states take."""
        return sum(s.nbytes for s in self.snapshots)

    @flushes_denormals  # on CPU, for the step's duration in the thread that runs it
    def execute(self, step: StepInput) -> Tensor:
        self.check_step(step)
        if step.state_saves or step.state_loads:
            for pool in self.snapshots:
                pool.apply(step.state_saves, step.state_loads)
        token_ids = torch.tensor(step.token_ids, dtype=torch.long, device=self.device)  # [T]
        # A decode step's compiled inputs straight from the step's lists, without a BatchLayout
        # (a third of the Python around the graph at batch 32); anything else through a layout.
        hidden = self._compiled_from_lists(step, token_ids) if self._takes_lists(step) else None
        if hidden is None:
            layout = BatchLayout.build(list(step.slots), list(step.starts), list(step.lengths), self.device,
                                       step.block_tables, keep_states=step.keep_states)
            hidden = self._forward(step, token_ids, layout)  # [T, H]
            if self.drafter is not None:
                self.drafter.record(layout, token_ids, hidden)
        index = torch.tensor(step.logits_index, dtype=torch.long, device=self.device)  # [R]
        return self.model.compute_logits(hidden[index])  # [R, V] float32

    def _forward(self, step: StepInput, token_ids: Tensor, layout: BatchLayout) -> Tensor:
        """Final-normed hidden states [T, H]: a decode step through the compiled decode where it
        is on; a mixed step (prefill chunks and one-token rows) as two passes, its one-token rows
        through the compiled decode and the rest eagerly; anything else eagerly."""
        if self.decode is None:
            return self.model(token_ids, layout, self.caches)
        if self.decode.supports(layout):
            hidden = self._compiled(token_ids, layout)
            return self.model(token_ids, layout, self.caches) if hidden is None else hidden
        split = self._split_one_token_rows(step)
        if split is None:
            return self.model(token_ids, layout, self.caches)
        (rows_1, layout_1), (rows_n, layout_n) = split
        hidden = torch.empty(len(step.token_ids), self.config.hidden_size,
                             dtype=self.model.lm_head.weight.dtype, device=self.device)
        # The two passes touch disjoint slots and blocks (shared prefix blocks are only read), so
        # their order does not matter; each row gets what it would get in a step of its own kind.
        hidden[rows_1] = self.decode(token_ids[rows_1], layout_1)
        hidden[rows_n] = self.model(token_ids[rows_n], layout_n, self.caches)
        return hidden

    def _compiled(self, token_ids: Tensor, layout: BatchLayout) -> Tensor | None:
        """The compiled decode's hidden states, or None where compiling the step's bucket (on its
        first use, without a background compile) failed: it ran on scratch rows, so the caller
        runs the step eagerly."""
        assert self.decode is not None
        try:
            return self.decode(token_ids, layout)  # [T, H]
        except DecodeCompileError as e:
            log.warning("compiled decode: %s (%s); this step and those of buckets not compiled run "
                        "eagerly", e, describe_error(e.__cause__))
            return None

    def _takes_lists(self, step: StepInput) -> bool:
        """A decode step the compiled decode takes from the step's lists: one token per sequence,
        block tables given, a model with attention layers, no drafter (which records the layout)."""
        return (self.decode is not None and self.drafter is None and step.block_tables is not None
                and self.decode.kv_cache is not None and not step.keep_states
                and all(n == 1 for n in step.lengths) and self.decode.takes(len(step.slots)))

    def _compiled_from_lists(self, step: StepInput, token_ids: Tensor) -> Tensor | None:
        """`_compiled` for a step `_takes_lists` (`CompiledDecode.decode_step`); None where the
        bucket's compile failed (on scratch rows), and the caller runs the step through a layout."""
        assert self.decode is not None and step.block_tables is not None
        try:
            return self.decode.decode_step(token_ids, step.slots, step.starts, step.block_tables)
        except DecodeCompileError as e:
            log.warning("compiled decode: %s (%s); this step and those of buckets not compiled run "
                        "eagerly", e, describe_error(e.__cause__))
            return None

    def _split_one_token_rows(self, step: StepInput,
                              ) -> tuple[tuple[Tensor, BatchLayout], tuple[Tensor, BatchLayout]] | None:
        """For a mixed step: (packed token indices, layout) of its one-token rows and of its other
        rows, or None where splitting does not pay or is not possible. In one eager pass every
        one-token row is padded to the step's longest chunk, so each costs as much as a prefill
        row (20 decodes beside 12 prompts of 32 tokens: 50 ms; split: 25 ms); the compiled decode
        runs them in a few ms. Speculative decoding's verify steps keep per-token states, which
        the compiled decode does not."""
        if step.keep_states:
            return None
        one = [b for b, n in enumerate(step.lengths) if n == 1]
        if not one or len(one) == len(step.lengths):
            return None
        many = [b for b, n in enumerate(step.lengths) if n > 1]
        offsets = [0]
        for n in step.lengths:
            offsets.append(offsets[-1] + n)

        def part(rows: list[int]) -> tuple[Tensor, BatchLayout]:
            tables = None if step.block_tables is None else [step.block_tables[b] for b in rows]
            layout = BatchLayout.build([step.slots[b] for b in rows], [step.starts[b] for b in rows],
                                       [step.lengths[b] for b in rows], self.device, tables)
            index = [i for b in rows for i in range(offsets[b], offsets[b + 1])]
            return torch.tensor(index, dtype=torch.long, device=self.device), layout

        decode_part = part(one)
        # Only through a bucket already compiled: a split never waits for a compile (under
        # serving the buckets compile in the background; `generate` compiles on decode steps).
        if (self.decode is None or not self.decode.supports(decode_part[1])
                or self.decode.bucket(len(one)) not in self.decode.steps):
            return None
        return decode_part, part(many)

    def propose(self, accepted: Sequence[int], next_token_ids: Sequence[int], num_drafts: Sequence[int],
                ) -> list[list[int]]:
        if self.drafter is None:
            raise RuntimeError("propose needs speculative_tokens > 0")
        drafts, rollbacks = self.drafter.propose(accepted, next_token_ids, num_drafts)
        for cache in self.caches:
            if isinstance(cache, DeltaNetState):
                cache.rollback(rollbacks)
        return drafts

    def compiled_buckets(self) -> tuple[tuple[int, ...], bool]:
        if self.decode is None:
            return (), False
        return tuple(sorted(self.decode.steps)), self.decode.compiling

    def compile_error(self) -> str:
        error = None if self.decode is None else self.decode.compile_error or self.decode.background_error
        return "" if error is None else f"compiled decode: {describe_error(error)}"

    def take_expert_counts(self) -> dict[int, list[int]]:
        return self.gate_tap.take()
