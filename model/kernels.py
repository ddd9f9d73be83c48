"""Which implementation each fast path of the model runs: the pure-torch reference (every
device, the one the tests hold everything to) or a GPU kernel. The choice is explicit: each
module that has one carries a `kernels` mode ("auto", "reference" or "kernel"), and the
functions here say what a call with given tensors runs.

- Gated DeltaNet (chunked prefill, recurrent decode) and its causal conv1d: flash-linear-attention's
  Triton kernels (the `fla-core` package, pyproject's `gpu` extra) on CUDA tensors.
- Routed experts: one grouped GEMM per projection (torch's F.grouped_mm) where torch has it for
  the weights' dtype and device, else a loop over experts.
- Full attention: SDPA over the gathered KV blocks; the compiled decode step uses SDPA on CUDA
  and the float32 einsum reference elsewhere.
"""

from __future__ import annotations

import functools
import importlib
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import Tensor

MODES = ("auto", "reference", "kernel")
FLA_EXTRA = "fla-core (pip install 'nextserve[gpu]')"


class KernelUnavailableError(RuntimeError):
    """mode "kernel" was asked for where the kernel cannot run; the message says why."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"kernels mode {mode!r} is not one of {MODES}")
    return mode


@functools.cache
def fla_ops() -> SimpleNamespace | None:
    """flash-linear-attention's ops used here, or None where fla-core is not installed (or does
    not import: it needs triton, which a CPU-only torch may lack); `fla_import_error()` says why."""
    try:
        gdr = importlib.import_module("fla.ops.gated_delta_rule")
        conv = importlib.import_module("fla.modules.causal_conv1d")
    except Exception as e:  # ImportError, or triton's own errors on a machine without a GPU
        _fla_error.append(f"{type(e).__name__}: {e}")
        return None
    return SimpleNamespace(chunk_gated_delta_rule=gdr.chunk_gated_delta_rule,
                           fused_recurrent_gated_delta_rule=gdr.fused_recurrent_gated_delta_rule,
                           causal_conv1d=conv.causal_conv1d,
                           causal_conv1d_update=conv.causal_conv1d_update)


_fla_error: list[str] = []


def fla_import_error() -> str | None:
    """Why fla-core did not import (None if it did, or was not tried yet)."""
    return _fla_error[-1] if _fla_error else None


def deltanet_backend(x: Tensor, mode: str = "auto") -> str:
    """"fla" (fla's chunked / recurrent gated delta rule and causal conv1d) or "torch"."""
    if check_mode(mode) == "reference":
        return "torch"
    if mode == "kernel":
        if fla_ops() is None:
            raise KernelUnavailableError(f"the Gated DeltaNet kernels need {FLA_EXTRA}")
        return "fla"
    return "fla" if x.is_cuda and fla_ops() is not None else "torch"


def grouped_mm_supported(x: Tensor, weight: Tensor) -> bool:
    """torch's grouped GEMM: on CPU for any matching dtype (torch >= 2.8), on CUDA for bf16 on
    compute capability 9.0+ (its CUTLASS kernel)."""
    if not hasattr(F, "grouped_mm") or x.dtype != weight.dtype or x.device != weight.device:
        return False
    if x.is_cuda:
        return x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device)[0] >= 9
    return x.device.type == "cpu"


def moe_backend(x: Tensor, weight: Tensor, mode: str = "auto") -> str:
    """"grouped_mm" (one grouped GEMM per projection) or "loop" (one expert at a time)."""
    if check_mode(mode) == "reference":
        return "loop"
    if grouped_mm_supported(x, weight):
        return "grouped_mm"
    if mode == "kernel":
        raise KernelUnavailableError(f"torch {torch.__version__} has no grouped GEMM for {x.dtype} "
                                     f"on {x.device}")
    return "loop"


def decode_moe_backend(x: Tensor, experts: torch.nn.Module, mode: str | None = None) -> str:
    """The compiled decode step's routed experts: "grouped_mm" (all the step's pairs through one
    grouped GEMM, each expert read once) on CUDA where torch has it, else "gather" (each row
    gathers its k experts' weights: static and fused by inductor on CPU, where grouped_mm has no
    float32 meta kernel; Bp·k experts' bytes per layer). FP8 experts gather (and dequantize) the
    pairs' experts. `mode` defaults to the experts' own."""
    mode = check_mode(mode or getattr(experts, "kernels", "auto"))
    if mode == "reference" or experts.gate_up.dtype != x.dtype or not x.is_cuda:
        return "gather"
    return "grouped_mm" if grouped_mm_supported(x, experts.gate_up) else "gather"


def decode_attention_backend(x: Tensor, mode: str = "auto") -> str:
    """The compiled decode step's attention: "sdpa" (fused kernels on CUDA) or "einsum" (the
    float32 reference, which inductor fuses well on CPU)."""
    if check_mode(mode) == "reference":
        return "einsum"
    return "sdpa" if x.is_cuda or mode == "kernel" else "einsum"


def set_kernels(module: torch.nn.Module, mode: str) -> torch.nn.Module:
    """Set the kernels mode of every submodule that has one (e.g. "reference" to time or check
    the pure-torch path on a GPU); returns `module`."""
    check_mode(mode)
    for m in module.modules():
        if hasattr(m, "kernels"):
            m.kernels = mode
    return module
