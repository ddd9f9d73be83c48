"""Full attention of both architectures: GQA, per-head q/k RMSNorm, (partial) RoPE, and for
Qwen3-Next a sigmoid output gate whose rows interleave with q's per head in q_proj.

Legend: T packed tokens, B sequences, L longest new run, Lk longest cached+new run,
N query heads, Nkv key/value heads, D head dim."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.batch import BatchLayout
from model.cache import KVCache
from model.config import ModelConfig
from model.norm import RMSNorm
from model.rope import RotaryEmbedding


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.N, self.Nkv, self.D = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.gated = c.attn_output_gate
        q_rows = self.N * self.D * (2 if self.gated else 1)
        self.q_proj = nn.Linear(c.hidden_size, q_rows, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, self.Nkv * self.D, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, self.Nkv * self.D, bias=c.attention_bias)
        self.o_proj = nn.Linear(self.N * self.D, c.hidden_size, bias=c.attention_bias)
        self.q_norm = RMSNorm(self.D, c.rms_norm_eps, zero_centered=c.zero_centered_norm)
        self.k_norm = RMSNorm(self.D, c.rms_norm_eps, zero_centered=c.zero_centered_norm)
        self.rotary = RotaryEmbedding(c.rope)
        # model/kernels.py: the compiled decode step's attention (SDPA on CUDA, einsum elsewhere);
        # this eager path runs SDPA over the gathered blocks on every device.
        self.kernels = "auto"

    def make_cache(self, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                   block_size: int = 16, num_blocks: int | None = None) -> KVCache:
        """`num_blocks` None: enough blocks for every slot at `max_len` tokens."""
        return KVCache(num_slots, max_len, self.Nkv, self.D, dtype, device, block_size, num_blocks)

    def project(self, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
        """x [T, hidden], positions [T] -> q [T, N, D], k and v [T, Nkv, D] (q, k normed and
        rotated), the output gate [T, N·D] or None."""
        T = x.shape[0]
        gate = None
        if self.gated:
            qg = self.q_proj(x).view(T, self.N, 2 * self.D)
            q, gate = qg[..., : self.D], qg[..., self.D:].reshape(T, self.N * self.D)
        else:
            q = self.q_proj(x).view(T, self.N, self.D)
        q = self.q_norm(q)
        k = self.k_norm(self.k_proj(x).view(T, self.Nkv, self.D))
        v = self.v_proj(x).view(T, self.Nkv, self.D)
        cos, sin = self.rotary.cos_sin(positions, q.dtype)
        return self.rotary.apply(q, cos, sin), self.rotary.apply(k, cos, sin), v, gate

    def output(self, o: Tensor, gate: Tensor | None) -> Tensor:
        """o [T, N·D] -> [T, hidden]."""
        if gate is not None:
            o = o * torch.sigmoid(gate)
        return self.o_proj(o)

    def forward(self, x: Tensor, layout: BatchLayout, cache: KVCache) -> Tensor:
        """x [T, hidden] -> [T, hidden]; appends this step's keys/values to `cache`."""
        T = x.shape[0]
        q, k, v, gate = self.project(x, layout.positions)
        cache.write(layout, k, v)
        keys, values = cache.read(layout)  # [B, Lk, Nkv, D]
        qp = layout.to_padded(q)  # [B, L, N, D]
        L, Lk = qp.shape[1], keys.shape[1]
        # Query i of sequence b sits at position starts[b] + i and sees keys at positions <= it.
        q_pos = layout.starts[:, None] + torch.arange(L, device=x.device)[None, :]  # [B, L]
        mask = torch.arange(Lk, device=x.device)[None, None, :] <= q_pos[:, :, None]  # [B, L, Lk]
        o = F.scaled_dot_product_attention(
            qp.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=mask[:, None], scale=self.D ** -0.5, enable_gqa=self.Nkv != self.N,
        )  # [B, N, L, D]
        return self.output(layout.to_packed(o.transpose(1, 2)).reshape(T, self.N * self.D), gate)
