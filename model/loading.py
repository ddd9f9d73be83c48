"""Fills a module's parameters from a checkpoint by name: a parameter `a.b.weight` of a module
loaded at prefix `p` is the checkpoint tensor `p` + `a.b.weight`; routed experts are read one
expert at a time from their per-expert tensors, and only the experts the module holds.

Block-wise FP8 checkpoints: by default every FP8 weight is dequantized as it is read (the
reader does it), so the model is the same plain module as for a float checkpoint. `keep_fp8`
instead swaps, before allocation, each Linear / Experts whose checkpoint weights are FP8 for
`Fp8Linear` / `Fp8Experts`, which hold the FP8 bytes and scales (half the memory of bf16)."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from model.fp8 import Fp8Experts, Fp8Linear
from model.moe import Experts, local_expert_index
from model.rope import RotaryEmbedding, rope_frequencies

FP8_MODES = ("auto", "dequantize", "keep")


def fp8_mode(mode: str, device: torch.device | str) -> str:
    """"keep" or "dequantize" for `mode`; "auto" keeps FP8 weights on a GPU only (a CPU has no
    FP8 GEMM, and dequantizing once at load beats dequantizing at every step)."""
    if mode not in FP8_MODES:
        raise ValueError(f"fp8 weights mode {mode!r} is not one of {FP8_MODES}")
    if mode == "auto":
        return "keep" if torch.device(device).type == "cuda" else "dequantize"
    return mode


def keep_fp8(module: nn.Module, reader, prefix: str, dtype: torch.dtype) -> int:
    """On a module built on the meta device, replace every bias-free Linear whose checkpoint
    weight is FP8 with an `Fp8Linear`, and every `Experts` whose experts are, with `Fp8Experts`
    (computing in `dtype`). Returns how many modules were replaced; none without FP8 weights."""
    quant = reader.quantization()
    if quant is None:
        return 0
    swaps: list[tuple[str, nn.Module]] = []
    block = quant.block
    with torch.device("meta"):  # the replacements are allocated by `materialize`, like the rest
        for name, m in module.named_modules():
            if isinstance(m, nn.Linear) and m.bias is None and reader.has(f"{prefix}{name}.weight"):
                if reader.is_fp8(f"{prefix}{name}.weight"):
                    swaps.append((name, Fp8Linear(m.in_features, m.out_features, block)))
            elif (isinstance(m, Experts) and not isinstance(m, Fp8Experts) and m.expert_ids
                  and reader.is_fp8(f"{prefix}{name}.{m.expert_ids[0]}.gate_proj.weight")):
                two_i, h = m.gate_up.shape[1:]
                swaps.append((name, Fp8Experts(h, two_i // 2, m.expert_ids, m.local_index.shape[0] - 1,
                                               block, dtype)))
    for name, new in swaps:
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent) if parent else module, child, new)
    return len(swaps)


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
            if isinstance(m, Fp8Linear):
                w, scale, _ = reader.get_fp8(f"{prefix}{name}.weight", shape=tuple(m.weight.shape))
                m.weight.copy_(w)
                m.weight_scale_inv.copy_(scale)
                continue
            for pname, p in m.named_parameters(recurse=False):
                full = f"{name}.{pname}" if name else pname
                if full in skip:
                    continue
                p.copy_(reader.get(prefix + full, shape=tuple(p.shape), dtype=p.dtype))


def load_experts(experts: Experts, reader, prefix: str) -> None:
    """`prefix` ends in `mlp.experts.`; reads `{e}.gate_proj/up_proj/down_proj.weight` per held e."""
    if isinstance(experts, Fp8Experts):
        load_fp8_experts(experts, reader, prefix)
        return
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


def load_fp8_experts(experts: Fp8Experts, reader, prefix: str) -> None:
    """As `load_experts`, keeping each expert's FP8 weights and block scales."""
    two_i, h = experts.gate_up.shape[1:]
    i = two_i // 2
    half = experts.gate_up_scale_inv.shape[1] // 2
    with torch.no_grad():
        for j, e in enumerate(experts.expert_ids):
            for rows, sc, proj in ((slice(0, i), slice(0, half), "gate_proj"),
                                   (slice(i, two_i), slice(half, 2 * half), "up_proj")):
                w, s, _ = reader.get_fp8(f"{prefix}{e}.{proj}.weight", shape=(i, h))
                experts.gate_up[j, rows] = w
                experts.gate_up_scale_inv[j, sc] = s
            w, s, _ = reader.get_fp8(f"{prefix}{e}.down_proj.weight", shape=(h, i))
            experts.down[j] = w
            experts.down_scale_inv[j] = s
