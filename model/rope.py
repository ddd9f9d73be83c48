"""Rotary position embedding: default, linear and YaRN frequencies over the leading
`rotary_dim` dims of each head (partial rotary), NeoX pairing (i, i + rotary_dim/2)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from model.config import RopeConfig


def rope_frequencies(rope: RopeConfig) -> tuple[Tensor, float]:
    """inv_freq [rotary_dim/2] and the factor cos/sin are multiplied by (YaRN's mscale)."""
    dim = rope.rotary_dim
    pos_freqs = rope.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    if rope.rope_type == "default":
        return inv_freq, 1.0
    if rope.rope_type == "linear":
        return inv_freq / rope.factor, 1.0
    return _yarn(rope, pos_freqs)


def _yarn(rope: RopeConfig, pos_freqs: Tensor) -> tuple[Tensor, float]:
    dim, base, factor = rope.rotary_dim, rope.theta, rope.factor
    original = rope.original_max_position_embeddings
    assert original is not None  # checked by ModelConfig

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = rope.attention_factor
    if attention_factor is None:
        if rope.mscale and rope.mscale_all_dim:
            attention_factor = mscale(factor, rope.mscale) / mscale(factor, rope.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(rope.beta_fast), correction_dim(rope.beta_slow)
    if rope.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolation_share = 1 - ramp
    interpolated, extrapolated = 1.0 / (factor * pos_freqs), 1.0 / pos_freqs
    inv_freq = interpolated * (1 - extrapolation_share) + extrapolated * extrapolation_share
    return inv_freq, float(attention_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, rope: RopeConfig) -> None:
        super().__init__()
        self.rope = rope
        inv_freq, self.scaling = rope_frequencies(rope)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.rotary_dim = rope.rotary_dim

    def cos_sin(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos, sin [T, rotary_dim] for absolute positions [T]."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return (emb.cos() * self.scaling).to(dtype), (emb.sin() * self.scaling).to(dtype)

    def apply(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """x [T, N, D]: rotate dims [:rotary_dim] of every head, pass the rest through."""
        r = self.rotary_dim
        x_rot, x_pass = x[..., :r], x[..., r:]
        half = r // 2
        rotated = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        x_rot = x_rot * cos[:, None, :] + rotated * sin[:, None, :]
        return torch.cat((x_rot, x_pass), dim=-1)
