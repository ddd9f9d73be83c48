"""Block-wise FP8 weights (config.json's quant_method fp8): quantize and dequantize a weight by
[bn, bk] tiles with one float32 scale each, and the modules that keep FP8 weights in memory
(`Fp8Linear`, `Fp8Experts`) for a GPU, whose products dequantize on the fly or run a
block-scaled GEMM (`torch.nn.functional.scaled_mm`, Hopper). By default only CUDA keeps FP8
weights (model/loading.py `fp8_mode`); elsewhere the reader dequantizes at load (model/weights.py).

Legend: N output rows, K input columns, bn / bk rows / columns per tile, E experts, I expert
intermediate size, H hidden, M tokens."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.moe import Experts, local_expert_index

log = logging.getLogger(__name__)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448
FP8_DTYPES = {torch.float8_e4m3fn, torch.float8_e4m3fnuz}


def scale_shape(shape: Sequence[int], block: tuple[int, int]) -> tuple[int, ...]:
    """[..., N, K] -> [..., ceil(N / bn), ceil(K / bk)]: edge tiles are smaller, not padded."""
    *lead, n, k = shape
    return (*lead, -(-n // block[0]), -(-k // block[1]))


def _tiles(x: Tensor, block: tuple[int, int]) -> tuple[Tensor, int, int]:
    """[..., N, K] -> [..., nN, bn, nK, bk] (zero-padded to whole tiles), and N, K."""
    *lead, n, k = x.shape
    bn, bk = block
    pn, pk = -(-n // bn) * bn - n, -(-k // bk) * bk - k
    x = F.pad(x, (0, pk, 0, pn))
    return x.reshape(*lead, (n + pn) // bn, bn, (k + pk) // bk, bk), n, k


def quantize_blockwise(w: Tensor, block: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """w [..., N, K] -> (float8_e4m3fn [..., N, K], scale_inv float32 [..., nN, nK]) such that
    w ≈ tile · scale_inv: each tile's largest magnitude maps to FP8's largest (448), as the
    Hugging Face / DeepSeek quantizers do."""
    tiles, n, k = _tiles(w.float(), block)
    amax = tiles.abs().amax(dim=(-3, -1))  # [..., nN, nK]
    scale_inv = (amax / FP8_MAX).clamp(min=1e-12)
    q = (tiles / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.reshape(*q.shape[:-4], q.shape[-4] * q.shape[-3], q.shape[-2] * q.shape[-1])
    return q[..., :n, :k].contiguous(), scale_inv


def dequantize_blockwise(w: Tensor, scale_inv: Tensor, block: tuple[int, int],
                         dtype: torch.dtype = torch.float32) -> Tensor:
    """float8 w [..., N, K], scale_inv [..., nN, nK] -> w · scale_inv per tile, in `dtype`
    (computed in float32, so every dtype rounds the same exact products)."""
    expected = scale_shape(w.shape, block)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"weight_scale_inv of shape {tuple(scale_inv.shape)} for a weight of shape "
                         f"{tuple(w.shape)} in tiles of {list(block)}: expected {expected}")
    n, k = w.shape[-2:]
    s = scale_inv.float().repeat_interleave(block[0], -2)[..., :n, :]
    s = s.repeat_interleave(block[1], -1)[..., :k]  # [..., N, K]
    return (w.float() * s).to(dtype)


def quantize_activations(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (float8 [M, K], decoding scales [M, K / group], outer-dim-major as the
    block-scaled GEMM wants them): dynamic per-token-group scaling (activation_scheme dynamic)."""
    M, K = x.shape
    g = x.float().view(M, K // group, group)
    scale = (g.abs().amax(-1) / FP8_MAX).clamp(min=1e-12)  # [M, K / group]
    q = (g / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).view(M, K)
    return q, scale.t().contiguous().t()


def block_scaled_mm_supported(x: Tensor, n: int, k: int, block: tuple[int, int]) -> bool:
    """Whether `block_scaled_linear` can run: a CUDA device of compute capability 9.x (the
    DeepSeek-recipe CUTLASS kernel), torch's scaled_mm with block recipes, 128x128 tiles and
    whole tiles along N and K."""
    if not x.is_cuda or not (hasattr(F, "scaled_mm") or hasattr(torch, "_scaled_mm")) or block != (128, 128):
        return False
    if n % 128 or k % 128:
        return False
    return torch.cuda.get_device_capability(x.device)[0] == 9


@functools.cache
def block_scaled_mm_works(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether this torch build's block-scaled GEMM runs on `device` and agrees with dequantizing
    (probed once per device on a [128, 256] @ [256, 256] product): a build without the DeepSeek
    recipe raises, and then every Fp8Linear dequantizes instead."""
    x = torch.randn(128, 256, device=device).to(dtype)
    if not block_scaled_mm_supported(x, 256, 256, (128, 128)) or dtype not in (torch.bfloat16, torch.float16):
        return False
    w, s = quantize_blockwise(torch.randn(256, 256, device=device) / 16, (128, 128))
    try:
        out = block_scaled_linear(x, w, s, (128, 128))
    except RuntimeError as e:
        log.warning("block-scaled FP8 GEMM unavailable on %s (%s): FP8 weights dequantize per call",
                    device, str(e).splitlines()[0] if str(e) else type(e).__name__)
        return False
    ref = F.linear(x, dequantize_blockwise(w, s, (128, 128), dtype)).float()
    err = float((out.float() - ref).abs().max() / ref.abs().max())
    if err > 6e-2:
        log.warning("block-scaled FP8 GEMM disagrees with dequantizing on %s (%.3g relative): not used",
                    device, err)
    return err <= 6e-2


def resolve_fp8_kernels(module: nn.Module, dtype: torch.dtype) -> None:
    """Fix each "auto" Fp8Linear of `module` (allocated on its device) to "scaled_mm" or
    "dequantize" now, so that a compiled graph never has to ask the device."""
    for m in module.modules():
        if isinstance(m, Fp8Linear) and m.kernel == "auto":
            x = torch.empty(0, device=m.weight.device, dtype=dtype)
            ok = (block_scaled_mm_supported(x, m.out_features, m.in_features, m.block)
                  and block_scaled_mm_works(m.weight.device, dtype))
            m.kernel = "scaled_mm" if ok else "dequantize"


def block_scaled_linear(x: Tensor, w: Tensor, scale_inv: Tensor, block: tuple[int, int]) -> Tensor:
    """x [M, K] @ dequantize(w [N, K]).T through one block-scaled FP8 GEMM: activations in 1x128
    groups, weights in 128x128 tiles (the DeepSeek recipe). Output in x's dtype (bf16 or fp16).
    torch's scaled_mm names its recipes BlockWise1x128 (2.13) or Blockwise_1x128 (2.9-2.10);
    without it, torch._scaled_mm infers the same recipe from the scales' shapes."""
    xq, xs = quantize_activations(x, block[1])
    ws = scale_inv.float().t()  # [K / 128, N / 128]
    if hasattr(F, "scaled_mm"):
        kinds = F.ScalingType
        a_kind = getattr(kinds, "BlockWise1x128", None) or kinds.Blockwise_1x128
        b_kind = getattr(kinds, "BlockWise128x128", None) or kinds.Blockwise_128x128
        return F.scaled_mm(xq, w.t(), xs, a_kind, ws, b_kind, output_dtype=x.dtype)
    return torch._scaled_mm(xq, w.t(), scale_a=xs, scale_b=ws, out_dtype=x.dtype)


class Fp8Linear(nn.Module):
    """A bias-free Linear whose weight stays float8 with its block scales. `kernel`:
    "auto" (block-scaled GEMM where `block_scaled_mm_supported`, else dequantize on the fly),
    "dequantize" (dequantize the weight at each call, any device), "scaled_mm"."""

    def __init__(self, in_features: int, out_features: int, block: tuple[int, int],
                 kernel: str = "auto") -> None:
        super().__init__()
        self.in_features, self.out_features, self.block = in_features, out_features, block
        self.kernel = kernel
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=FP8_DTYPE))
        self.register_buffer("weight_scale_inv",
                             torch.ones(scale_shape((out_features, in_features), block)))

    def choice(self, x: Tensor) -> str:
        if self.kernel != "auto":
            return self.kernel
        ok = block_scaled_mm_supported(x, self.out_features, self.in_features, self.block)
        return "scaled_mm" if ok and x.dtype in (torch.bfloat16, torch.float16) else "dequantize"

    def forward(self, x: Tensor) -> Tensor:
        if self.choice(x) == "scaled_mm":
            lead = x.shape[:-1]
            return block_scaled_linear(x.reshape(-1, self.in_features), self.weight, self.weight_scale_inv,
                                       self.block).view(*lead, self.out_features)
        return F.linear(x, dequantize_blockwise(self.weight, self.weight_scale_inv, self.block, x.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={list(self.block)}"


class Fp8Experts(Experts):
    """`Experts` whose stacked weights stay float8 (gate_up [E, 2I, H], down [E, H, I]) with
    their per-expert tile scales; each call dequantizes only the experts its tokens chose (per
    expert, on the fly) and runs the same grouped product as the unquantized experts. The gate
    and up halves keep their own scale rows (gate_up_scale_inv [E, 2·ceil(I/bn), ceil(H/bk)]),
    so an I that is not a multiple of bn needs no re-tiling."""

    def __init__(self, hidden: int, intermediate: int, expert_ids: Sequence[int], num_experts: int,
                 block: tuple[int, int], dtype: torch.dtype) -> None:
        super().__init__(hidden, intermediate, [], num_experts)
        self.expert_ids = tuple(int(e) for e in expert_ids)
        E, I, H = len(self.expert_ids), intermediate, hidden
        self.block, self.compute_dtype, self.intermediate = block, dtype, intermediate
        del self.gate_up, self.down
        self.register_buffer("gate_up", torch.zeros(E, 2 * I, H, dtype=FP8_DTYPE))
        self.register_buffer("down", torch.zeros(E, H, I, dtype=FP8_DTYPE))
        gs = scale_shape((I, H), block)
        self.register_buffer("gate_up_scale_inv", torch.ones(E, 2 * gs[0], gs[1]))
        self.register_buffer("down_scale_inv", torch.ones(E, *scale_shape((H, I), block)))
        self.local_index = local_expert_index(self.expert_ids, num_experts)

    def gathered(self, j: Tensor) -> tuple[Tensor, Tensor]:
        """Stacked experts j (any shape [...]) -> their gate_up [..., 2I, H] and down [..., H, I],
        dequantized to the compute dtype."""
        I, half = self.intermediate, self.gate_up_scale_inv.shape[1] // 2
        gu, gus = self.gate_up[j], self.gate_up_scale_inv[j]
        gate = dequantize_blockwise(gu[..., :I, :], gus[..., :half, :], self.block, self.compute_dtype)
        up = dequantize_blockwise(gu[..., I:, :], gus[..., half:, :], self.block, self.compute_dtype)
        down = dequantize_blockwise(self.down[j], self.down_scale_inv[j], self.block, self.compute_dtype)
        return torch.cat([gate, up], dim=-2), down

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        k = ids.shape[1]
        local = self.local_index[ids].flatten()
        pairs = (local >= 0).nonzero().squeeze(1)
        if pairs.numel() == 0:
            return out
        pairs = pairs[torch.argsort(local[pairs], stable=True)]
        used, counts = torch.unique_consecutive(local[pairs], return_counts=True)  # sorted above
        gate_up, down = self.gathered(used)  # only the experts this step's tokens chose
        rows = pairs // k
        y = self._swiglu(x[rows], counts, gate_up, down)
        y = y * weights.flatten()[pairs, None]
        return out.index_add_(0, rows, y.to(out.dtype))
