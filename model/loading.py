"""Fills a module's parameters from a checkpoint by name: a parameter `a.b.weight` of a module
loaded at prefix `p` is the checkpoint tensor `p` + `a.b.weight`; routed experts are read one
expert at a time from their per-expert tensors, and only the experts the module holds."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from model.moe import Experts, local_expert_index
from model.rope import RotaryEmbedding, rope_frequencies


def materialize(module: nn.Module, device: torch.device | str, dtype: torch.dtype) -> None:
    """Allocate (uninitialised) storage for a module built on the meta device, in `dtype`;
    recompute the buffers that are derived, not loaded."""
    module.to_empty(device=device)
    for p in module.parameters():
        p.data = p.data.to(dtype)
    for m in module.modules():
        if isinstance(m, RotaryEmbedding):
            m.inv_freq = rope_frequencies(m.rope)[0].to(device)
        elif isinstance(m, Experts):
            m.local_index = local_expert_index(m.expert_ids, m.local_index.shape[0] - 1).to(device)


def load_module(module: nn.Module, reader, prefix: str, skip: Iterable[str] = ()) -> None:
    """Read every parameter of `module` from `reader` (a CheckpointReader) under `prefix`."""
    skip = set(skip)
    experts = {name for name, m in module.named_modules() if isinstance(m, Experts)}
    with torch.no_grad():
        for name, m in module.named_modules():
            if name in experts:
                load_experts(m, reader, f"{prefix}{name}.")
                continue
            if any(name == e or name.startswith(e + ".") for e in experts):
                continue
            for pname, p in m.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if full in skip:
                    continue
                p.copy_(reader.get(prefix + full, shape=tuple(p.shape), dtype=p.dtype))


def load_experts(experts: Experts, reader, prefix: str) -> None:
    """`prefix` ends in `mlp.experts.`; reads `{e}.gate_proj/up_proj/down_proj.weight` per held e."""
    two_i, h = experts.gate_up.shape[1:]
    i = two_i // 2
    dtype = experts.gate_up.dtype
    with torch.no_grad():
        for j, e in enumerate(experts.expert_ids):
            gate = reader.get(f"{prefix}{e}.gate_proj.weight", shape=(i, h), dtype=dtype)
            up = reader.get(f"{prefix}{e}.up_proj.weight", shape=(i, h), dtype=dtype)
            experts.gate_up[j, :i] = gate
            experts.gate_up[j, i:] = up
            experts.down[j] = reader.get(f"{prefix}{e}.down_proj.weight", shape=(h, i), dtype=dtype)
