"""Chunked gated delta rule against the token-by-token recurrence (our reference), and both
against transformers' torch functions; right-padded batches against each sequence alone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.delta_rule import chunk_gated_delta_rule, recurrent_gated_delta_rule

ATOL = 2e-5  # outputs are O(0.1-1); float32 reordering noise is ~1e-7 per op (spec §7)


def inputs(B: int, T: int, H: int = 4, K: int = 16, V: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    k = F.normalize(torch.randn(B, T, H, K, generator=g), dim=-1)
    v = torch.randn(B, T, H, V, generator=g)
    decay = -torch.rand(B, T, H, generator=g) * 0.5
    beta = torch.rand(B, T, H, generator=g)
    state = torch.randn(B, H, K, V, generator=g) * 0.3
    return q, k, v, decay, beta, state


@pytest.mark.parametrize("T", [1, 2, 63, 64, 65, 150, 200])
def test_chunked_equals_recurrent(T):
    args = inputs(2, T, seed=T)
    o_ref, s_ref = recurrent_gated_delta_rule(*args)
    o, s = chunk_gated_delta_rule(*args)
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("T", [5, 32, 33, 100])
def test_no_state_is_a_zero_state(T):
    """state None (a step of new prompts) skips the zero state's products: the same bits as a
    zero state, over one chunk and several, and the recurrence's result."""
    q, k, v, decay, beta, state = inputs(3, T, seed=T)
    zero = torch.zeros_like(state)
    o, s = chunk_gated_delta_rule(q, k, v, decay, beta, None)
    o_zero, s_zero = chunk_gated_delta_rule(q, k, v, decay, beta, zero)
    assert torch.equal(o, o_zero) and torch.equal(s, s_zero)
    o_ref, s_ref = recurrent_gated_delta_rule(q, k, v, decay, beta, zero)
    torch.testing.assert_close(o, o_ref, atol=ATOL, rtol=0)
    torch.testing.assert_close(s, s_ref, atol=ATOL, rtol=0)


def test_the_caller_state_is_left_alone():
    """The recurrence updates its own copy of the state in place, never the caller's tensor."""
    args = inputs(3, 4, seed=7)
    before = args[-1].clone()
    recurrent_gated_delta_rule(*args)
    chunk_gated_delta_rule(*args)
    assert torch.equal(args[-1], before)


@pytest.mark.parametrize("chunk_size", [16, 64])
def test_state_carries_across_calls(chunk_size):
    q, k, v, g, b, s0 = inputs(1, 130, seed=1)
    o_all, s_all = chunk_gated_delta_rule(q, k, v, g, b, s0, chunk_size=chunk_size)
    outs, s = [], s0
    for lo, hi in ((0, 37), (37, 38), (38, 101), (101, 130)):
        rule = recurrent_gated_delta_rule if hi - lo == 1 else chunk_gated_delta_rule
        o, s = rule(q[:, lo:hi], k[:, lo:hi], v[:, lo:hi], g[:, lo:hi], b[:, lo:hi], s)
        outs.append(o)
    torch.testing.assert_close(torch.cat(outs, 1), o_all, atol=ATOL, rtol=0)
    torch.testing.assert_close(s, s_all, atol=ATOL, rtol=0)


def test_right_padded_batch_equals_each_sequence_alone():
    lengths = [5, 70, 1, 129]
    T = max(lengths)
    q, k, v, g, b, s0 = inputs(len(lengths), T, seed=2)
    valid = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    g, b = g * valid[..., None], b * valid[..., None]  # padded tokens: beta = g = 0
    o, s = chunk_gated_delta_rule(q, k, v, g, b, s0)
    for i, n in enumerate(lengths):
        o_i, s_i = recurrent_gated_delta_rule(q[i:i + 1, :n], k[i:i + 1, :n], v[i:i + 1, :n],
                                              g[i:i + 1, :n], b[i:i + 1, :n], s0[i:i + 1])
        torch.testing.assert_close(o[i:i + 1, :n], o_i, atol=ATOL, rtol=0)
        torch.testing.assert_close(s[i:i + 1], s_i, atol=ATOL, rtol=0)


@pytest.mark.parametrize("T", [1, 65, 150])
def test_matches_transformers_reference(T):
    from transformers.models.qwen3_next import modeling_qwen3_next as ref

    q, k, v, g, b, s0 = inputs(2, T, seed=3)
    o_hf, s_hf = ref.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=b, initial_state=s0,
                                                  output_final_state=True)
    o, s = chunk_gated_delta_rule(q, k, v, g, b, s0)
    torch.testing.assert_close(o, o_hf, atol=ATOL, rtol=0)
    torch.testing.assert_close(s, s_hf, atol=ATOL, rtol=0)
    o_hf, s_hf = ref.torch_recurrent_gated_delta_rule(q, k, v, g=g, beta=b, initial_state=s0,
                                                      output_final_state=True)
    o, s = recurrent_gated_delta_rule(q, k, v, g, b, s0)
    torch.testing.assert_close(o, o_hf, atol=ATOL, rtol=0)
    torch.testing.assert_close(s, s_hf, atol=ATOL, rtol=0)
