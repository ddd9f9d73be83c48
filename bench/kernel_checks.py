"""Each GPU kernel against its pure-torch reference on the same random inputs, at given widths:
the delta rule (fla's chunked and fused-recurrent kernels), a whole Gated DeltaNet layer through
fla (conv included) over a mixed prefill/decode step, grouped-GEMM MoE, SDPA decode attention,
the block-scaled FP8 GEMM and FP8 experts dequantized on the fly. Used by bench/gpu_check.py
and tests/model/test_kernels_gpu.py; each check returns a row with its relative error
(max |out - ref| / max |ref|) beside the README's tolerance, or why it was skipped."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model import kernels, kernels_fla
from model.batch import BatchLayout
from model.config import ModelConfig
from model.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from model.fp8 import Fp8Experts, Fp8Linear, block_scaled_mm_supported, quantize_blockwise
from model.gated_deltanet import GatedDeltaNet, l2norm
from model.moe import Experts

# Relative tolerances (max |kernel - reference| / max |reference|), bf16 kernels against float32
# or bf16 references; the README lists them.
TOLERANCES = {
    "delta_rule_chunk": 2e-2, "delta_rule_recurrent": 2e-2, "deltanet_layer": 3e-2,
    "moe_grouped_mm": 2e-2, "decode_attention_sdpa": 2e-2, "fp8_block_scaled_mm": 6e-2,
    "fp8_experts_on_the_fly": 1e-2, "cuda_graph_decode": 3e-2,
}


@dataclass(frozen=True)
class Widths:
    hidden: int = 2048
    heads: int = 16
    kv_heads: int = 2
    head_dim: int = 256
    key_heads: int = 16  # DeltaNet
    value_heads: int = 32
    key_dim: int = 128
    value_dim: int = 128
    experts: int = 512
    top_k: int = 10
    expert_dim: int = 512
    shared_dim: int = 512
    vocab: int = 1024  # the stacks are timed without a real vocabulary's head

    def hub_config(self, layers: int, dtype: str = "bfloat16") -> dict[str, Any]:
        """A Qwen3-Next config.json of these widths (3 DeltaNet layers to 1 attention layer)."""
        return {
            "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": self.vocab,
            "hidden_size": self.hidden, "num_hidden_layers": layers, "full_attention_interval": 4,
            "num_attention_heads": self.heads, "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "partial_rotary_factor": 0.25, "rope_theta": 10_000_000, "linear_num_key_heads": self.key_heads,
            "linear_num_value_heads": self.value_heads, "linear_key_head_dim": self.key_dim,
            "linear_value_head_dim": self.value_dim, "linear_conv_kernel_dim": 4, "num_experts": self.experts,
            "num_experts_per_tok": self.top_k, "norm_topk_prob": True,
            "moe_intermediate_size": self.expert_dim, "shared_expert_intermediate_size": self.shared_dim,
            "intermediate_size": 4 * self.expert_dim, "decoder_sparse_step": 1, "mlp_only_layers": [],
            "hidden_act": "silu", "rms_norm_eps": 1e-6, "max_position_embeddings": 65536,
            "tie_word_embeddings": False, "attention_bias": False, "torch_dtype": dtype,
            "bos_token_id": 0, "eos_token_id": 1,
        }


REAL = Widths()
SMALL = Widths(hidden=64, heads=4, kv_heads=2, head_dim=32, key_heads=2, value_heads=4, key_dim=16,
               value_dim=16, experts=16, top_k=4, expert_dim=32, shared_dim=32, vocab=256)


def rel_err(out: Tensor, ref: Tensor) -> float:
    ref = ref.float()
    return float((out.float() - ref).abs().max() / ref.abs().max().clamp(min=1e-30))


def row(name: str, err: float | None, note: str = "") -> dict[str, Any]:
    tol = TOLERANCES[name]
    return {"check": name, "rel_err": err, "tolerance": tol,
            "ok": None if err is None else bool(err <= tol), "note": note}


def _fla_missing(name: str) -> dict[str, Any] | None:
    if kernels.fla_ops() is None:
        return row(name, None, "skipped: fla-core not importable (reference paths only)")
    return None


def _delta_inputs(w: Widths, lengths: list[int], device, dtype, g: torch.Generator):
    T, N = sum(lengths), len(lengths)
    G, H, K, V = w.key_heads, w.value_heads, w.key_dim, w.value_dim

    def rnd(*s):
        return torch.randn(*s, generator=g).to(device)

    q, k, v = rnd(T, G, K).to(dtype), rnd(T, G, K).to(dtype), rnd(T, H, V).to(dtype)
    decay = -F.softplus(rnd(T, H)) * 0.3  # log-decay <= 0
    beta = torch.sigmoid(rnd(T, H)).to(dtype)
    state = rnd(N, H, K, V) * 0.1
    return q, k, v, decay, beta, state


def _reference_rule(rule, q, k, v, decay, beta, state, lengths):
    """Per sequence, in float32, q/k L2-normed and repeated to the value heads."""
    r = v.shape[1] // q.shape[1]
    outs, finals, start = [], [], 0
    for n, length in enumerate(lengths):
        sl = slice(start, start + length)
        qn = l2norm(q[sl].float()).repeat_interleave(r, 1)[None]
        kn = l2norm(k[sl].float()).repeat_interleave(r, 1)[None]
        o, s = rule(qn, kn, v[sl].float()[None], decay[sl][None], beta[sl].float()[None], state[n:n + 1])
        outs.append(o[0])
        finals.append(s)
        start += length
    return torch.cat(outs), torch.cat(finals)


def check_delta_rule_chunk(w: Widths, device, dtype, seed: int = 0) -> dict[str, Any]:
    if (skip := _fla_missing("delta_rule_chunk")) is not None:
        return skip
    lengths = [300, 64, 17] if w is REAL else [20, 7, 3]
    g = torch.Generator().manual_seed(seed)
    q, k, v, decay, beta, state = _delta_inputs(w, lengths, device, dtype, g)
    layout = BatchLayout.build(list(range(len(lengths))), [0] * len(lengths), lengths, device=device)
    o, s = kernels_fla.delta_rule(q, k, v, decay, beta, state, layout)
    o_ref, s_ref = _reference_rule(chunk_gated_delta_rule, q, k, v, decay, beta, state, lengths)
    return row("delta_rule_chunk", max(rel_err(o, o_ref), rel_err(s, s_ref)), f"varlen {lengths}")


def check_delta_rule_recurrent(w: Widths, device, dtype, seed: int = 1) -> dict[str, Any]:
    if (skip := _fla_missing("delta_rule_recurrent")) is not None:
        return skip
    lengths = [1] * (32 if w is REAL else 4)
    g = torch.Generator().manual_seed(seed)
    q, k, v, decay, beta, state = _delta_inputs(w, lengths, device, dtype, g)
    layout = BatchLayout.build(list(range(len(lengths))), [5] * len(lengths), lengths, device=device)
    o, s = kernels_fla.delta_rule(q, k, v, decay, beta, state, layout)
    o_ref, s_ref = _reference_rule(recurrent_gated_delta_rule, q, k, v, decay, beta, state, lengths)
    return row("delta_rule_recurrent", max(rel_err(o, o_ref), rel_err(s, s_ref)), f"batch {len(lengths)}")


def randomize_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill in place, on the module's own device: weights ~ N(0, 1/fan_in), 1-D parameters
    small, DeltaNet's A_log = log U(1, 16) as in the checkpoints. Returns `module`."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("A_log"):
                p.uniform_(1, 16, generator=g).log_()
            elif p.dim() > 1:
                p.normal_(0, p.shape[-1] ** -0.5, generator=g)
            else:
                p.normal_(0, 0.1, generator=g)
    return module


def check_deltanet_layer(w: Widths, device, dtype, seed: int = 2) -> dict[str, Any]:
    """A whole layer, fla (conv, delta rule, glue) against the padded reference: a prefill of
    mixed lengths (one sequence continuing from its state), then a decode step."""
    if (skip := _fla_missing("deltanet_layer")) is not None:
        return skip
    config = ModelConfig.from_hf(w.hub_config(1))
    g = torch.Generator().manual_seed(seed)
    with torch.device(device):
        layer = randomize_(GatedDeltaNet(config), seed).to(dtype).eval()
    states = [layer.make_state(3, dtype, device) for _ in range(2)]
    errs = []
    steps = [([0], [0], [40]), ([0, 1, 2], [40, 0, 0], [25, 130, 3]), ([0, 1, 2], [65, 130, 3], [1, 1, 1])]
    with torch.inference_mode():
        for slots, starts, lengths in steps:
            layout = BatchLayout.build(slots, starts, lengths, device=device)
            x = torch.randn(sum(lengths), config.hidden_size, generator=g).to(device=device, dtype=dtype)
            outs = []
            for mode, state in zip(("reference", "kernel"), states, strict=True):
                layer.kernels = mode
                outs.append(layer(x, layout, state))
            errs.append(rel_err(outs[1], outs[0]))
    errs.append(rel_err(states[1].recurrent, states[0].recurrent))
    errs.append(rel_err(states[1].conv, states[0].conv))
    return row("deltanet_layer", max(errs), "prefill 40 | 25+130+3 (one continuing) | decode 3")


def check_moe_grouped_mm(w: Widths, device, dtype, seed: int = 3) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    with torch.device(device):  # built where it runs: 512 float32 experts are 6 GiB
        ex = randomize_(Experts(w.hidden, w.expert_dim, range(w.experts), w.experts), seed).to(dtype)
    T = 64
    x = torch.randn(T, w.hidden, generator=g).to(device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(w.experts, generator=g)[:w.top_k] for _ in range(T)]).to(device)
    weights = torch.rand(T, w.top_k, generator=g).to(device=device, dtype=dtype)
    if kernels.moe_backend(x, ex.gate_up) != "grouped_mm":
        return row("moe_grouped_mm", None, f"skipped: no grouped GEMM for {dtype} on {device}")
    with torch.inference_mode():
        ex.kernels = "reference"
        ref = ex(x, ids, weights)
        ex.kernels = "auto"
        out = ex(x, ids, weights)
    return row("moe_grouped_mm", rel_err(out, ref), f"{T} tokens, top-{w.top_k} of {w.experts}")


def check_decode_attention(w: Widths, device, dtype, seed: int = 4) -> dict[str, Any]:
    from model.attention import Attention
    from model.decode_math import DecodeInputs, attention_decode

    config = ModelConfig.from_hf(w.hub_config(4))
    g = torch.Generator().manual_seed(seed)
    with torch.device(device):
        attn = randomize_(Attention(config), seed).to(dtype)
    B, blocks, bs = 8, 64, 16
    k_cache = torch.randn(blocks + 1, bs, w.kv_heads, w.head_dim, generator=g).to(device=device, dtype=dtype)
    v_cache = torch.randn(blocks + 1, bs, w.kv_heads, w.head_dim, generator=g).to(device=device, dtype=dtype)
    lens = torch.randint(1, 8 * bs, (B,), generator=g)
    Lk = 8 * bs
    read_at = torch.stack([torch.randperm(blocks * bs, generator=g)[:Lk] for _ in range(B)])
    inp = DecodeInputs(positions=(lens - 1).to(device), slots=torch.arange(B, device=device),
                       fresh=torch.zeros(B, dtype=torch.bool, device=device),
                       write_at=read_at[torch.arange(B), lens - 1].to(device), read_at=read_at.to(device),
                       kv_len=lens.to(device))
    x = torch.randn(B, w.hidden, generator=g).to(device=device, dtype=dtype)
    outs = []
    with torch.inference_mode():
        for mode in ("reference", "kernel"):
            attn.kernels = mode
            outs.append(attention_decode(attn, x, inp, k_cache.clone(), v_cache.clone()))
    return row("decode_attention_sdpa", rel_err(outs[1], outs[0]), f"batch {B}, up to {Lk} keys")


def check_fp8_block_scaled_mm(w: Widths, device, dtype, seed: int = 5) -> dict[str, Any]:
    N, K = 4 * w.hidden, w.hidden
    g = torch.Generator().manual_seed(seed)
    lin = Fp8Linear(K, N, (128, 128)).to(device)
    q, s = quantize_blockwise(torch.randn(N, K, generator=g) / K ** 0.5, (128, 128))
    lin.weight.copy_(q.to(device))
    lin.weight_scale_inv.copy_(s.to(device))
    x = torch.randn(32, K, generator=g).to(device=device, dtype=dtype)
    if not (block_scaled_mm_supported(x, N, K, lin.block) and dtype in (torch.bfloat16, torch.float16)):
        return row("fp8_block_scaled_mm", None, f"skipped: no block-scaled FP8 GEMM for {dtype} on {device}")
    with torch.inference_mode():
        lin.kernel = "dequantize"
        ref = lin(x)
        lin.kernel = "scaled_mm"
        try:
            out = lin(x)
        except RuntimeError as e:  # this torch build lacks the recipe: recorded, not fatal
            return row("fp8_block_scaled_mm", None, f"failed: {str(e).splitlines()[0][:200]}")
    return row("fp8_block_scaled_mm", rel_err(out, ref), f"[32, {K}] @ [{K}, {N}], activations in 1x128")


def check_fp8_experts(w: Widths, device, dtype, seed: int = 6) -> dict[str, Any]:
    """Experts kept FP8 and dequantized per call against the same weights dequantized once."""
    g = torch.Generator().manual_seed(seed)
    E, I, H = min(w.experts, 64), w.expert_dim, w.hidden
    block = (128, 128) if w is REAL else (16, 16)
    fp8 = Fp8Experts(H, I, range(E), E, block, dtype).to(device)
    plain = Experts(H, I, range(E), E).to(device=device, dtype=dtype)
    gu, gus = quantize_blockwise(torch.randn(E, 2 * I, H, generator=g) / H ** 0.5, block)
    dn, dns = quantize_blockwise(torch.randn(E, H, I, generator=g) / I ** 0.5, block)
    with torch.no_grad():
        fp8.gate_up.copy_(gu.to(device))
        fp8.gate_up_scale_inv.copy_(gus.to(device))
        fp8.down.copy_(dn.to(device))
        fp8.down_scale_inv.copy_(dns.to(device))
        plain.gate_up.copy_(fp8.gathered(torch.arange(E, device=device))[0])
        plain.down.copy_(fp8.gathered(torch.arange(E, device=device))[1])
    T = 32
    x = torch.randn(T, H, generator=g).to(device=device, dtype=dtype)
    ids = torch.stack([torch.randperm(E, generator=g)[:w.top_k] for _ in range(T)]).to(device)
    weights = torch.rand(T, w.top_k, generator=g).to(device=device, dtype=dtype)
    with torch.inference_mode():
        return row("fp8_experts_on_the_fly", rel_err(fp8(x, ids, weights), plain(x, ids, weights)),
                   f"{E} experts, {T} tokens")


CHECKS: list[Callable[..., dict[str, Any]]] = [
    check_delta_rule_chunk, check_delta_rule_recurrent, check_deltanet_layer, check_moe_grouped_mm,
    check_decode_attention, check_fp8_block_scaled_mm, check_fp8_experts,
]


def run_checks(w: Widths, device, dtype) -> list[dict[str, Any]]:
    """Every check; one that raises is a failed row naming the error, not the end of the run."""
    rows = []
    for check in CHECKS:
        name = check.__name__.removeprefix("check_")
        try:
            rows.append(check(w, device, dtype))
        except Exception as e:  # a GPU script must report every check, whatever one of them hits
            first = str(e).splitlines()[0][:300] if str(e) else ""
            rows.append({"check": name, "rel_err": None, "ok": False,
                         "note": f"error: {type(e).__name__}: {first}"})
    return rows
