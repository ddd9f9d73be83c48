"""The `local` executor: the whole model in this process, with one cache per layer (a paged KV
cache, or DeltaNet state for every slot). The reference the cluster executor is checked against."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from engine.block_manager import blocks_for
from engine.executor import Executor, StepInput, check_cache_sizes, register_executor
from model.batch import BatchLayout
from model.decoder import CausalLM
from model.moe import SparseMoeBlock
from monitoring.gate_tap import GateTap

# By default the KV cache is allocated up front for num_slots × max_model_len tokens; the
# checkpoints' native context (262k for Qwen3-Next) would not fit, so without an explicit length
# we cap it here (a smaller num_kv_blocks makes room for a longer one).
DEFAULT_MAX_MODEL_LEN = 4096


@register_executor("local")
class LocalExecutor(Executor):
    def __init__(self, model_dir: str | Path, dtype: str | None = None, num_slots: int = 8,
                 max_model_len: int | None = None, device: torch.device | str = "cpu",
                 block_size: int = 16, num_kv_blocks: int | None = None) -> None:
        """`num_kv_blocks` None: every slot can hold max_model_len tokens (the engine never
        preempts)."""
        check_cache_sizes(num_slots, block_size, num_kv_blocks)
        self.model = CausalLM.from_pretrained(model_dir, dtype=dtype, device=device)
        self.config = self.model.config
        if max_model_len is None:
            max_model_len = min(self.config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be >= 1, got {max_model_len}")
        self.num_slots = num_slots
        self.max_model_len = max_model_len
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks or num_slots * blocks_for(max_model_len, block_size)
        self.device = torch.device(device)
        self.caches = self.model.make_caches(num_slots, max_model_len, block_size, self.num_kv_blocks)
        # The gate's routing result, read at its boundary for expert-load metrics.
        gates = {i: layer.mlp.gate for i, layer in enumerate(self.model.model.layers)
                 if isinstance(layer.mlp, SparseMoeBlock)}
        self.gate_tap = GateTap(gates, self.config.num_experts)

    def execute(self, step: StepInput) -> Tensor:
        if any(not 0 <= s < self.num_slots for s in step.slots):
            raise ValueError(f"slots {step.slots} outside 0..{self.num_slots - 1}")
        if any(s + n > self.max_model_len for s, n in zip(step.starts, step.lengths, strict=True)):
            raise ValueError(f"a sequence of the step runs past max_model_len={self.max_model_len}")
        layout = BatchLayout.build(list(step.slots), list(step.starts), list(step.lengths), self.device,
                                   step.block_tables)
        token_ids = torch.tensor(step.token_ids, dtype=torch.long, device=self.device)  # [T]
        hidden = self.model(token_ids, layout, self.caches)  # [T, H]
        index = torch.tensor(step.logits_index, dtype=torch.long, device=self.device)  # [R]
        return self.model.compute_logits(hidden[index])  # [R, V] float32

    def take_expert_counts(self) -> dict[int, list[int]]:
        return self.gate_tap.take()
