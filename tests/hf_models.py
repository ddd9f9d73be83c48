"""Tiny random-weight checkpoints written by transformers' own classes (save_pretrained), the
reference every comparison in tests/ is made against."""

from __future__ import annotations

import math
from pathlib import Path

import torch

TINY_NEXT = dict(
    vocab_size=384, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=8, num_experts_per_tok=3,
    moe_intermediate_size=32, shared_expert_intermediate_size=48, intermediate_size=96,
    max_position_embeddings=1024, mlp_only_layers=[2], norm_topk_prob=True,
    layer_types=["linear_attention", "linear_attention", "linear_attention", "full_attention",
                 "linear_attention"],
    rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0, "partial_rotary_factor": 0.25},
    eos_token_id=1, bos_token_id=0,
)
TINY_MOE = dict(
    vocab_size=384, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, intermediate_size=96,
    max_position_embeddings=1024, decoder_sparse_step=2, norm_topk_prob=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                     "original_max_position_embeddings": 256},
    eos_token_id=1, bos_token_id=0,
)


def randomize(model: torch.nn.Module, seed: int) -> None:
    """HF's init leaves norms at their identity and most signals tiny; spread every parameter so
    that each block matters and greedy tokens have clear margins."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("A_log"):
                p.copy_(torch.empty(p.shape).uniform_(1, 16, generator=g).log())
            elif name.endswith("dt_bias"):
                p.copy_(torch.rand(p.shape, generator=g))
            elif "norm" in name:
                centre = 1.0 if (p.data == 1).all() else 0.0  # plain norms start at 1, zero-centred at 0
                p.copy_(centre + 0.1 * torch.randn(p.shape, generator=g))
            elif "conv1d" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
            else:
                fan_in = p.shape[-1] if p.dim() > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
        if hasattr(model, "lm_head"):
            model.lm_head.weight.mul_(2.0)


def save_hf_model(arch: str, path: Path, seed: int = 0, dtype: torch.dtype = torch.float32,
                  **overrides) -> Path:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM, Qwen3NextConfig, Qwen3NextForCausalLM

    if arch == "qwen3_next":
        config = Qwen3NextConfig(**{**TINY_NEXT, **overrides})
        cls = Qwen3NextForCausalLM
    else:
        config = Qwen3MoeConfig(**{**TINY_MOE, **overrides})
        cls = Qwen3MoeForCausalLM
    torch.manual_seed(seed)
    model = cls(config)
    randomize(model, seed)
    model.to(dtype).save_pretrained(path)
    return path


def load_hf_model(path: Path, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
