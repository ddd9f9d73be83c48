"""Gated DeltaNet token mixer of Qwen3-Next: projections in the checkpoint's per-key-head
layout, causal depthwise conv with carried state, and the gated delta rule with carried state.

Legend: T packed tokens, B sequences, L longest new run, G key heads, H value heads,
K key head dim, V value head dim, C conv channels (2·G·K + H·V), W conv kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model import kernels_fla
from model.batch import BatchLayout
from model.cache import DeltaNetState
from model.config import ModelConfig
from model.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from model.kernels import deltanet_backend
from model.norm import GatedRMSNorm


def l2norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + eps)


class GatedDeltaNet(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        c = config
        self.G, self.H = c.linear_num_key_heads, c.linear_num_value_heads
        self.K, self.V = c.linear_key_head_dim, c.linear_value_head_dim
        self.W = c.linear_conv_kernel_dim
        self.conv_dim = c.linear_conv_dim
        r = self.H // self.G  # value heads per key head
        self.in_proj_qkvz = nn.Linear(c.hidden_size, self.G * (2 * self.K + 2 * r * self.V), bias=False)
        self.in_proj_ba = nn.Linear(c.hidden_size, 2 * self.H, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.W, groups=self.conv_dim, bias=False)
        self.A_log = nn.Parameter(torch.zeros(self.H))
        self.dt_bias = nn.Parameter(torch.ones(self.H))
        self.norm = GatedRMSNorm(self.V, eps=c.rms_norm_eps)
        self.out_proj = nn.Linear(self.H * self.V, c.hidden_size, bias=False)
        self.kernels = "auto"  # model/kernels.py: fla's kernels on CUDA where installed

    def make_state(self, num_slots: int, dtype: torch.dtype, device: torch.device | str) -> DeltaNetState:
        return DeltaNetState(num_slots, self.conv_dim, self.W, self.H, self.K, self.V, dtype, device)

    def split_projections(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        """The checkpoint groups rows per key head g: [q K | k K | v r·V | z r·V] and [b r | a r]."""
        T, r = x.shape[0], self.H // self.G
        qkvz = self.in_proj_qkvz(x).view(T, self.G, 2 * self.K + 2 * r * self.V)
        q, k, v, z = torch.split(qkvz, [self.K, self.K, r * self.V, r * self.V], dim=-1)
        ba = self.in_proj_ba(x).view(T, self.G, 2 * r)
        b, a = torch.split(ba, [r, r], dim=-1)
        return (q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1),
                z.reshape(T, self.H, self.V), b.reshape(T, self.H), a.reshape(T, self.H))

    def decay_and_beta(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
        """a, b [T, H] -> log-decay g = -exp(A_log)·softplus(a + dt_bias) (float32), beta = sigmoid(b)."""
        return -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias), b.sigmoid()

    def _conv(self, mixed: Tensor, conv_state: Tensor, layout: BatchLayout,
              ) -> tuple[Tensor, Tensor, Tensor | None]:
        """mixed [B, L, C] (right-padded), conv_state [B, C, W-1] -> silu(conv) [B, L, C], new state,
        and with layout.keep_states = n the state after each of the first n tokens [B, n, C, W-1]."""
        x = torch.cat([conv_state.to(mixed.dtype), mixed.transpose(1, 2)], dim=-1)  # [B, C, W-1+L]
        y = F.conv1d(x, self.conv1d.weight, groups=self.conv_dim)  # [B, C, L]
        # The new state is the last W-1 inputs of each sequence's own (unpadded) run.
        idx = layout.lengths[:, None] + torch.arange(self.W - 1, device=x.device)[None, :]  # [B, W-1]
        new_state = torch.gather(x, 2, idx[:, None, :].expand(-1, self.conv_dim, -1))
        kept = None
        if layout.keep_states:  # after token t: inputs t+1 .. t+W-1 of x
            n = min(layout.keep_states, mixed.shape[1])
            kept = x.unfold(2, self.W - 1, 1)[:, :, 1:n + 1].transpose(1, 2).clone()  # [B, n, C, W-1]
        return F.silu(y).transpose(1, 2), new_state, kept

    def forward(self, x: Tensor, layout: BatchLayout, state: DeltaNetState) -> Tensor:
        """x [T, hidden] -> [T, hidden]; reads and writes `state` at the layout's slots."""
        if deltanet_backend(x, self.kernels) == "fla" and not layout.keep_states:
            return self._forward_fla(x, layout, state)
        T = x.shape[0]
        q, k, v, z, b, a = self.split_projections(x)
        mixed = layout.to_padded(torch.cat([q, k, v], dim=-1))  # [B, L, C]
        conv_state, rec_state = state.read(layout)
        mixed, conv_state, kept_conv = self._conv(mixed, conv_state, layout)
        B, L = mixed.shape[:2]
        q, k, v = torch.split(mixed, [self.G * self.K, self.G * self.K, self.H * self.V], dim=-1)
        q = l2norm(q.reshape(B, L, self.G, self.K).float())
        k = l2norm(k.reshape(B, L, self.G, self.K).float())
        v = v.reshape(B, L, self.H, self.V)
        r = self.H // self.G
        q, k = q.repeat_interleave(r, dim=2), k.repeat_interleave(r, dim=2)

        g, beta = self.decay_and_beta(a, b)
        beta, g = layout.to_padded(beta), layout.to_padded(g)  # padded tokens: beta = g = 0, exact
        if layout.keep_states:
            # Speculative decoding's verify step (a few tokens per sequence): the state after each
            # of the first n tokens is kept for the rollback to the last accepted one. The
            # recurrence is what a decode step runs, so accepted tokens see the same arithmetic as
            # without speculation; a long prefill chunk in the same step runs it too, once more
            # for its first n tokens only.
            n = min(layout.keep_states, L)
            kept_rec = rec_state.new_empty(B, n, *rec_state.shape[1:])
            if n == L:
                o, new_rec = recurrent_gated_delta_rule(q, k, v, g, beta, rec_state, kept_rec)
            else:
                o, new_rec = chunk_gated_delta_rule(q, k, v, g, beta, rec_state)
                recurrent_gated_delta_rule(q[:, :n], k[:, :n], v[:, :n], g[:, :n], beta[:, :n], rec_state,
                                           kept_rec)
            rec_state = new_rec
            state.keep(layout, kept_conv, kept_rec)
        else:
            if layout.is_decode:
                o, rec_state = recurrent_gated_delta_rule(q, k, v, g, beta, rec_state)  # [B, L, H, V]
            else:  # a step of new prompts only (a burst) skips the zero state's products
                fresh = bool((layout.starts == 0).all())
                o, rec_state = chunk_gated_delta_rule(q, k, v, g, beta, None if fresh else rec_state)
        state.write(layout, conv_state, rec_state)

        o = self.norm(layout.to_packed(o), z)  # [T, H, V]
        return self.out_proj(o.reshape(T, self.H * self.V))

    def _forward_fla(self, x: Tensor, layout: BatchLayout, state: DeltaNetState) -> Tensor:
        """`forward` through fla's kernels on the packed tokens (no padding; model/kernels_fla.py)."""
        T = x.shape[0]
        q, k, v, z, b, a = self.split_projections(x)
        conv_state, rec_state = state.read(layout)
        mixed, conv_state = kernels_fla.conv(torch.cat([q, k, v], dim=-1), self.conv1d.weight[:, 0],
                                             conv_state, layout)  # [T, C]
        q, k, v = torch.split(mixed, [self.G * self.K, self.G * self.K, self.H * self.V], dim=-1)
        g, beta = self.decay_and_beta(a, b)
        o, rec_state = kernels_fla.delta_rule(q.reshape(T, self.G, self.K), k.reshape(T, self.G, self.K),
                                              v.reshape(T, self.H, self.V), g, beta, rec_state, layout)
        state.write(layout, conv_state, rec_state)
        o = self.norm(o, z)  # [T, H, V]
        return self.out_proj(o.reshape(T, self.H * self.V))
