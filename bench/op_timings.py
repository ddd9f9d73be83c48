"""Single-operation timings for bench/gpu_check.py: the decode step's attention over the paged
cache (SDPA against the float32 einsum) and FP8 weights kept in memory (block-scaled GEMM,
dequantized per call) beside bf16."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from bench.gpu_timing import timed
from bench.kernel_checks import REAL, Widths, randomize_
from model.config import ModelConfig


def time_fp8(w: Widths, device: torch.device, dtype: torch.dtype, sizes: list[int]) -> list[dict[str, Any]]:
    """FP8 weights kept in memory, both ways, beside bf16: DeltaNet's in_proj_qkvz as a Linear
    (block-scaled GEMM where it runs, dequantized per call) and a layer's routed experts
    (dequantized per expert on the fly), at `sizes` tokens. Milliseconds per call."""
    from model.fp8 import Fp8Experts, Fp8Linear, block_scaled_mm_works, quantize_blockwise
    from model.moe import Experts

    block = (128, 128) if w is REAL else (16, 16)
    g = torch.Generator().manual_seed(7)
    K = w.hidden
    N = w.key_heads * (2 * w.key_dim) + 2 * w.value_heads * w.value_dim
    weight = (torch.randn(N, K, generator=g) / K ** 0.5).to(device)
    dense = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    fp8 = Fp8Linear(K, N, block).to(device)
    q, s = quantize_blockwise(weight, block)
    with torch.no_grad():
        dense.weight.copy_(weight)
        fp8.weight.copy_(q)
        fp8.weight_scale_inv.copy_(s)
    scaled_ok = block_scaled_mm_works(device, dtype) if device.type == "cuda" else False
    rows = []
    with torch.inference_mode():
        for m in sizes:
            x = torch.randn(m, K, generator=g).to(device=device, dtype=dtype)
            r: dict[str, Any] = {"op": f"linear {K}->{N}", "tokens": m,
                                 "bf16_ms": 1e3 * timed(lambda x=x: dense(x), device, repeats=20)}
            fp8.kernel = "dequantize"
            r["fp8_dequantize_ms"] = 1e3 * timed(lambda x=x: fp8(x), device, repeats=20)
            if scaled_ok:
                fp8.kernel = "scaled_mm"
                r["fp8_scaled_mm_ms"] = 1e3 * timed(lambda x=x: fp8(x), device, repeats=20)
            rows.append(r)
        E, I = w.experts, w.expert_dim
        plain = Experts(K, I, range(E), E).to(device=device, dtype=dtype)
        kept = Fp8Experts(K, I, range(E), E, block, dtype).to(device)
        for j in range(0, E, 64):  # quantized in slices: a float32 copy of all experts may not fit
            sl = slice(j, j + 64)
            gu = torch.randn(min(64, E - j), 2 * I, K, device=device) / K ** 0.5
            dn = torch.randn(min(64, E - j), K, I, device=device) / I ** 0.5
            (kept.gate_up[sl], kept.gate_up_scale_inv[sl]) = quantize_blockwise(gu, block)
            (kept.down[sl], kept.down_scale_inv[sl]) = quantize_blockwise(dn, block)
            plain.gate_up[sl], plain.down[sl] = gu.to(dtype), dn.to(dtype)
        for m in sizes:
            x = torch.randn(m, K, generator=g).to(device=device, dtype=dtype)
            ids = torch.stack([torch.randperm(E, generator=g)[:w.top_k] for _ in range(m)]).to(device)
            wts = torch.rand(m, w.top_k, generator=g).to(device=device, dtype=dtype)
            rows.append({"op": f"experts {E}x{I} top-{w.top_k}", "tokens": m,
                         "bf16_ms": 1e3 * timed(lambda x=x, i=ids, v=wts: plain(x, i, v), device, repeats=10),
                         "fp8_dequantize_ms": 1e3 * timed(lambda x=x, i=ids, v=wts: kept(x, i, v), device,
                                                          repeats=10)})
    return rows


def time_attention(w: Widths, device: torch.device, dtype: torch.dtype, batches: list[int],
                   context: int) -> list[dict[str, Any]]:
    """The decode step's attention over the paged cache (gathered blocks), eagerly: SDPA (the
    CUDA choice) against the float32 einsum, every row at `context` keys. Milliseconds per call."""
    from model.attention import Attention
    from model.decode_math import DecodeInputs, attention_decode

    config = ModelConfig.from_hf(w.hub_config(4))
    with torch.device(device):
        attn = randomize_(Attention(config), 0).to(dtype)
    rows = []
    bs = 16
    per_row = -(-context // bs)
    with torch.inference_mode():
        for b in batches:
            shape = (b * per_row + 1, bs, w.kv_heads, w.head_dim)
            k_cache = torch.randn(shape, device=device, dtype=dtype)
            v_cache = torch.randn(shape, device=device, dtype=dtype)
            read_at = torch.arange(b * per_row * bs, device=device).view(b, -1)[:, :context]
            inp = DecodeInputs(positions=torch.full((b,), context - 1, device=device),
                               slots=torch.arange(b, device=device),
                               fresh=torch.zeros(b, dtype=torch.bool, device=device),
                               write_at=read_at[:, -1].contiguous(), read_at=read_at,
                               kv_len=torch.full((b,), context, device=device))
            x = torch.randn(b, w.hidden, device=device, dtype=dtype)
            r: dict[str, Any] = {"batch": b, "context": context}
            for mode, key in (("kernel", "sdpa_ms"), ("reference", "einsum_ms")):
                attn.kernels = mode
                def call(x=x, i=inp, kc=k_cache, vc=v_cache) -> Tensor:
                    return attention_decode(attn, x, i, kc, vc)

                r[key] = 1e3 * timed(call, device, repeats=10)
            rows.append(r)
    return rows
