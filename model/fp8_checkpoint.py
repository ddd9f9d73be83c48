"""write_fp8_copy: a block-wise FP8 copy of a float checkpoint in the layout of Qwen's "-FP8"
releases (and DeepSeek-V3's): each converted 2-D `*.weight` becomes float8_e4m3fn beside its
`*.weight_scale_inv`, config.json gains `quantization_config`, everything else is copied. For
tests and benchmarks; a real FP8 checkpoint is read the same way."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from model.config import ModelConfig, quant_config_from_hf
from model.fp8 import quantize_blockwise
from model.weights import INDEX_FILE, CheckpointReader


def default_modules_to_not_convert(config: ModelConfig) -> list[str]:
    """What Qwen's FP8 releases keep in bf16, listed module by module as their config.json does:
    embeddings and LM head, the routers (gate, shared_expert_gate) and DeltaNet's small in_proj_ba
    (norms, conv and 1-D tensors are never converted: only 2-D Linear weights are)."""
    names = ["lm_head", "model.embed_tokens"]
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        if config.layer_types[i] == "linear_attention":
            names.append(p + "linear_attn.in_proj_ba")
        if config.is_moe_layer(i):
            names.append(p + "mlp.gate")
            if config.shared_expert_intermediate_size:
                names.append(p + "mlp.shared_expert_gate")
    names.append("mtp.fc")
    return names


def write_fp8_copy(src: str | Path, dst: str | Path, block: Sequence[int] = (128, 128),
                   modules_to_not_convert: Sequence[str] | None = None) -> Path:
    """Write the FP8 copy of checkpoint `src` to `dst` (one safetensors file) and return `dst`."""
    src, dst = Path(src), Path(dst)
    config = ModelConfig.from_dir(src)
    if config.quantization is not None:
        raise ValueError(f"{src} is already quantized ({config.quantization.method})")
    skip = list(default_modules_to_not_convert(config) if modules_to_not_convert is None
                else modules_to_not_convert)
    raw_quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                 "weight_block_size": [int(b) for b in block], "modules_to_not_convert": skip}
    quant = quant_config_from_hf(raw_quant)
    assert quant is not None
    dst.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    with CheckpointReader(src) as reader:
        for name in sorted(reader.names()):
            t = reader.get(name)
            module = name.rsplit(".", 1)[0]
            if name.endswith(".weight") and t.dim() == 2 and quant.converts(module):
                tensors[name], tensors[name + "_scale_inv"] = quantize_blockwise(t, quant.block)
            else:
                tensors[name] = t.contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors") and f.name not in (INDEX_FILE, "config.json"):
            shutil.copyfile(f, dst / f.name)
    raw = json.loads((src / "config.json").read_text())
    raw["quantization_config"] = raw_quant
    (dst / "config.json").write_text(json.dumps(raw, indent=2))
    return dst
