"""The kernel seam on CPU: what each mode picks for CPU tensors (always the pure-torch reference
under "auto"), and the packed-varlen glue to flash-linear-attention (model/kernels_fla.py) run
against pure-torch stand-ins written to fla-core 0.6's documented semantics (varlen cu_seqlens,
GVA head mapping, the [N, D, W] conv state, L2 norm in the kernel), so that the GPU run only
has the kernels themselves left to check (tests/model/test_kernels_gpu.py)."""

from __future__ import annotations

import itertools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from model import kernels
from model.batch import BatchLayout
from model.decoder import CausalLM
from model.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule
from model.gated_deltanet import GatedDeltaNet, l2norm
from model.kernels import (
    KernelUnavailableError,
    decode_attention_backend,
    deltanet_backend,
    moe_backend,
    set_kernels,
)
from model.tiny import make_tiny_model


def test_cpu_tensors_take_the_reference_under_auto():
    x = torch.zeros(4, 8)
    assert deltanet_backend(x) == "torch" and deltanet_backend(x, "reference") == "torch"
    assert decode_attention_backend(x) == "einsum"
    w = torch.zeros(2, 8, 8)
    assert moe_backend(x, w, "reference") == "loop"
    # torch's grouped GEMM is pure torch too, and runs on CPU where this torch has it
    assert moe_backend(x, w) == ("grouped_mm" if hasattr(F, "grouped_mm") else "loop")
    assert moe_backend(x, w.double()) == "loop"  # dtypes differ: the loop
    with pytest.raises(ValueError, match="kernels mode 'fast'"):
        deltanet_backend(x, "fast")


def test_kernel_mode_without_fla_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(kernels, "fla_ops", lambda: None)
    with pytest.raises(KernelUnavailableError, match="fla-core"):
        deltanet_backend(torch.zeros(1), "kernel")


def test_fla_is_not_installed_here():
    """The CPU venv must not have fla-core (transformers would then call its GPU kernels)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine may have fla-core (pyproject's gpu extra)")
    assert kernels.fla_ops() is None


def test_set_kernels_reaches_every_module_with_a_choice(tmp_path):
    model = CausalLM.from_pretrained(make_tiny_model(tmp_path / "m"))
    set_kernels(model, "reference")
    modes = {type(m).__name__: m.kernels for m in model.modules() if hasattr(m, "kernels")}
    assert modes == {"GatedDeltaNet": "reference", "Experts": "reference", "Attention": "reference"}
    with pytest.raises(ValueError, match="kernels mode"):
        set_kernels(model, "triton")


# -- pure-torch stand-ins for fla's four ops, to fla-core 0.6's signatures and semantics -----------

def _per_sequence(cu_seqlens, T):
    bounds = [0, T] if cu_seqlens is None else cu_seqlens.tolist()
    return [slice(a, b) for a, b in itertools.pairwise(bounds)]


def _gdr(q, k, v, g, beta, initial_state, output_final_state, use_qk_l2norm_in_kernel,
         cu_seqlens=None, scale=None, rule=recurrent_gated_delta_rule):
    assert scale is None and output_final_state
    B, T, G, _K = q.shape
    HV = v.shape[2]
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q.float()).to(q.dtype), l2norm(k.float()).to(k.dtype)
    q, k = q.repeat_interleave(HV // G, dim=2), k.repeat_interleave(HV // G, dim=2)  # GVA
    if cu_seqlens is None:  # one sequence per batch row
        return rule(q, k, v, g, beta, initial_state)
    assert B == 1
    outs, finals = [], []
    for n, sl in enumerate(_per_sequence(cu_seqlens, T)):
        o, s = rule(q[:, sl], k[:, sl], v[:, sl], g[:, sl], beta[:, sl], initial_state[n:n + 1])
        outs.append(o)
        finals.append(s)
    return torch.cat(outs, 1), torch.cat(finals)


def _conv(x, weight, initial_state, output_final_state, activation, cu_seqlens):
    D, W = weight.shape
    ys, finals = [], []
    for n, sl in enumerate(_per_sequence(cu_seqlens, x.shape[1])):
        full = torch.cat([initial_state[n].to(x.dtype), x[0, sl].T], dim=-1)  # [D, W + L]
        y = F.conv1d(full[None, :, 1:], weight[:, None], groups=D)[0].T  # the last W-1 of the state
        ys.append(F.silu(y) if activation == "silu" else y)
        finals.append(full[:, -W:])
    return torch.cat(ys)[None], torch.stack(finals)


def _conv_update(x, cache, weight, activation):
    new = torch.cat([cache[..., 1:], x[..., None].to(cache.dtype)], dim=-1)
    cache.copy_(new)  # fla's update kernel shifts the state in place
    y = (new * weight).sum(-1)
    return (F.silu(y) if activation == "silu" else y).to(x.dtype), cache


FAKE_FLA = SimpleNamespace(
    # the same chunked math as the reference's prefill, so that only the glue can differ
    chunk_gated_delta_rule=lambda q, k, v, g, beta, **kw: _gdr(q, k, v, g, beta, **kw,
                                                               rule=chunk_gated_delta_rule),
    fused_recurrent_gated_delta_rule=lambda q, k, v, g, beta, **kw: _gdr(q, k, v, g, beta, **kw),
    causal_conv1d=lambda x, weight, **kw: _conv(x, weight, **{k: kw.get(k) for k in (
        "initial_state", "output_final_state", "activation", "cu_seqlens")}),
    causal_conv1d_update=_conv_update,
)


@pytest.fixture
def fake_fla(monkeypatch):
    monkeypatch.setattr(kernels, "fla_ops", lambda: FAKE_FLA)


def test_packed_varlen_glue_matches_the_padded_reference(fake_fla, tmp_path):
    """The whole tiny model, DeltaNet layers through the fla glue vs the pure-torch path: a
    chunked prefill (one sequence continues from its state, one starts), then decode steps."""
    path = make_tiny_model(tmp_path / "m")
    ref, glue = CausalLM.from_pretrained(path), CausalLM.from_pretrained(path)
    set_kernels(ref, "reference")
    for m in glue.modules():
        if isinstance(m, GatedDeltaNet):
            m.kernels = "kernel"
    caches = {id(m): m.make_caches(3, 64) for m in (ref, glue)}
    prompts = {0: [5, 9, 13, 2, 77, 31, 8, 40, 41], 1: [101, 7], 2: [3, 250, 17, 44, 12]}

    def step(slots, starts, tokens):
        layout = BatchLayout.build(slots, starts, [len(t) for t in tokens])
        ids = torch.tensor([t for ts in tokens for t in ts])
        last = layout.last_token_index()
        out = [m.compute_logits(m(ids, layout, caches[id(m)])[last]) for m in (ref, glue)]
        torch.testing.assert_close(out[1], out[0], rtol=0, atol=1e-5 * out[0].abs().max().item())
        return out[0].argmax(-1).tolist()

    step([0], [0], [prompts[0][:4]])  # the first chunk of slot 0's prompt
    nxt = step([0, 1, 2], [4, 0, 0], [prompts[0][4:], prompts[1], prompts[2]])  # its rest beside two new
    lengths = [len(prompts[s]) for s in (0, 1, 2)]
    for _ in range(3):
        nxt = step([0, 1, 2], lengths, [[t] for t in nxt])
        lengths = [n + 1 for n in lengths]
    for cr, cg in zip(caches[id(ref)], caches[id(glue)], strict=True):
        if hasattr(cr, "recurrent"):
            torch.testing.assert_close(cg.recurrent, cr.recurrent, rtol=0, atol=1e-5)
            torch.testing.assert_close(cg.conv, cr.conv, rtol=0, atol=1e-5)
