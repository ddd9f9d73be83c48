"""RMS norms of the two architectures: plain x·w (Qwen3 MoE), zero-centred x·(1+w) (Qwen3-Next),
and the DeltaNet output norm gated by silu(z). Statistics in float32, as the reference."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """`zero_centered`: weight stored around 0 and applied as (1 + w), cast after the multiply."""

    def __init__(self, dim: int, eps: float, zero_centered: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if zero_centered else torch.ones(dim))
        self.eps = eps
        self.zero_centered = zero_centered

    def forward(self, x: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.zero_centered:
            return (xf * (1.0 + self.weight.float())).to(dtype)
        # Qwen3 MoE casts back before the weight multiply.
        return self.weight * xf.to(dtype)


class GatedRMSNorm(nn.Module):
    """Per-head norm of the DeltaNet output: w · norm(o) · silu(z), plain w (not 1 + w)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor, gate: Tensor) -> Tensor:
        dtype = x.dtype
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        y = self.weight * xf.to(dtype)
        return (y * F.silu(gate.float())).to(dtype)
