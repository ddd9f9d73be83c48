"""The Gated DeltaNet mixer's conv and delta rule through flash-linear-attention's kernels, on
the step's packed tokens (fla's varlen layout: batch 1 and cu_seqlens), beside the padded pure-torch
path in model/gated_deltanet.py that it must match.

Layout notes (fla-core 0.6): q, k [1, T, G, K] with GVA (value head h reads key head h // (H/G),
as repeat_interleave does); the recurrent state [B, H, K, V] float32 as ours; the conv state
[B, C, W] holding the last W inputs, of which the kernels read the last W-1 (ours holds those
W-1, so a zero column is put in front). Legend as model/gated_deltanet.py."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from model import kernels
from model.batch import BatchLayout


def _ops():
    ops = kernels.fla_ops()  # looked up at call time: tests stand pure-torch ops in for it
    if ops is None:
        raise kernels.KernelUnavailableError(f"the Gated DeltaNet kernels need {kernels.FLA_EXTRA}")
    return ops


def cu_seqlens(layout: BatchLayout) -> Tensor:
    """[B + 1] long offsets of each sequence's new tokens in the packed step (cached per layout)."""
    key = "cu_seqlens"
    if key not in layout.derived:
        layout.derived[key] = F.pad(torch.cumsum(layout.lengths, 0), (1, 0))
    return layout.derived[key]


def conv(mixed: Tensor, weight: Tensor, conv_state: Tensor, layout: BatchLayout) -> tuple[Tensor, Tensor]:
    """mixed [T, C] packed, weight [C, W], conv_state [B, C, W-1] -> silu(causal conv) [T, C] and
    the new state [B, C, W-1] (each sequence's last W-1 inputs)."""
    ops = _ops()
    state = F.pad(conv_state.to(mixed.dtype), (1, 0))  # [B, C, W]
    if layout.is_decode:  # one token per sequence: the update kernel shifts the state in place
        y, state = ops.causal_conv1d_update(x=mixed, cache=state, weight=weight, activation="silu")
        return y, state[..., 1:]
    y, final = ops.causal_conv1d(x=mixed[None], weight=weight, initial_state=state, output_final_state=True,
                                 activation="silu", cu_seqlens=cu_seqlens(layout))
    return y[0], final[..., 1:]


def delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor,
               layout: BatchLayout) -> tuple[Tensor, Tensor]:
    """q, k [T, G, K] (not yet L2-normed: the kernels norm them), v [T, H, V], g, beta [T, H],
    state [B, H, K, V] float32 -> o [T, H, V] and the final state [B, H, K, V] float32.
    Decode steps take the fused recurrent kernel (one token per sequence), others the chunked one."""
    ops = _ops()
    g, beta = g.float(), beta.to(q.dtype)
    if layout.is_decode:  # [B, 1, ...]: each sequence is its own batch row
        o, final = ops.fused_recurrent_gated_delta_rule(
            q=q[:, None], k=k[:, None], v=v[:, None], g=g[:, None], beta=beta[:, None],
            initial_state=state, output_final_state=True, use_qk_l2norm_in_kernel=True)
        return o[:, 0], final
    o, final = ops.chunk_gated_delta_rule(
        q=q[None], k=k[None], v=v[None], g=g[None], beta=beta[None], initial_state=state,
        output_final_state=True, use_qk_l2norm_in_kernel=True, cu_seqlens=cu_seqlens(layout))
    return o[0], final
