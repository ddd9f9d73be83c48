"""The gated delta rule, two ways: a token-by-token recurrence (decode, and the reference) and
the chunked UT-transform form (prefill). Both carry the state between calls.

Legend: B sequences, T tokens, H value heads (q/k already repeated to H), K key dim, V value dim.
Inputs q, k [B, T, H, K] (L2-normed), v [B, T, H, V], log-decay g [B, T, H] (<= 0), beta [B, T, H];
state [B, H, K, V] float32. Right padding is exact when the padded tokens have g = beta = 0:
they neither decay nor write the state, and a causal step never reads tokens after it."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def recurrent_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                               state: Tensor, kept: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """S ← exp(g)·S; δ = β(v − Sᵀk); S ← S + k δᵀ; o = Sᵀq. Returns o [B, T, H, V] (dtype of v)
    and the final state [B, H, K, V] float32. `kept` [B, n, H, K, V] float32 (speculative
    decoding): receives the state after each of the first n tokens."""
    out_dtype = v.dtype
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    g, beta = g.float().transpose(1, 2), beta.float().transpose(1, 2)  # [B, H, T]
    q = q * q.shape[-1] ** -0.5
    B, H, K, V = state.shape
    # Decode is bound by passes over S (B·H·K·V floats): one copy, then every update in place,
    # and the products as batched [1, K] @ [K, V] matmuls that read S where it lies.
    S = state.float().clone()
    out = torch.empty_like(v)
    for t in range(q.shape[2]):
        S.mul_(g[:, :, t].exp()[..., None, None])
        k_t = k[:, :, t, None, :]  # [B, H, 1, K]
        delta = beta[:, :, t, None] * (v[:, :, t] - (k_t @ S).squeeze(-2))  # [B, H, V]
        S.view(B * H, K, V).baddbmm_(k_t.reshape(B * H, K, 1), delta.reshape(B * H, 1, V))
        out[:, :, t] = (q[:, :, t, None, :] @ S).squeeze(-2)
        if kept is not None and t < kept.shape[1]:
            kept[:, t] = S
    return out.transpose(1, 2).to(out_dtype), S


# Tokens per chunk. The work inside a chunk grows with C² (its decay matrix, the UT solve), across
# chunks with T·K·V; 32 halved the prefill of 32-token prompts against 64 (half of each 64-chunk
# was padding) and was no slower for prompts of 128 to 2048 tokens (float32, one CPU thread,
# K = V = 64: README "Serving").
CHUNK_SIZE = 32


def chunk_gated_delta_rule(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor, state: Tensor | None,
                           chunk_size: int = CHUNK_SIZE) -> tuple[Tensor, Tensor]:
    """Same result as the recurrence: within a chunk of C tokens the C rank-1 updates are folded
    into one lower-triangular solve (the UT transform); chunks are scanned in order. `state`
    None: every sequence starts from zeros (a batch of new prompts), the same result as a zero
    state with the products of the zero state left out: for prompts of one chunk that is a solve
    and two batched matmuls of the three the chunk would take."""
    out_dtype = v.dtype
    B, T, H, _ = q.shape
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, *]
    g, beta = g.float().transpose(1, 2), beta.float().transpose(1, 2)
    q = q * q.shape[-1] ** -0.5

    C = chunk_size
    pad = (C - T % C) % C  # padded tokens get beta = g = 0: exact, see module doc
    if pad:
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
    n = (T + pad) // C
    q, k, v = (x.reshape(B, H, n, C, x.shape[-1]) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, C), beta.reshape(B, H, n, C)

    cum = g.cumsum(-1)  # [B, H, n, C] log-decay from the chunk start to each token
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[i, j] = exp(cum_i - cum_j) for j <= i, else 0
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    k_beta = k * beta[..., None]
    # (I + A) where A[i, j] = β_i (k_i·k_j) decay[i, j] for j < i: the UT system.
    system = (k_beta @ k.transpose(-1, -2)) * decay
    u = torch.linalg.solve_triangular(system, v * beta[..., None], upper=False, unitriangular=True)
    attn = (q @ k.transpose(-1, -2)) * decay  # intra-chunk, causal incl. the diagonal
    k_to_end = k * (cum[..., -1:] - cum).exp()[..., None]
    chunk_decay = cum[..., -1].exp()[..., None, None]  # [B, H, n, 1, 1]
    out = torch.empty_like(v)
    S = None if state is None else state.float().clone()
    if S is None:  # the first chunk from a zero state: nothing to predict, nothing to decay
        out[:, :, 0] = attn[:, :, 0] @ u[:, :, 0]
        S = k_to_end[:, :, 0].transpose(-1, -2) @ u[:, :, 0]  # [B, H, K, V]
        first = 1
    else:
        first = 0
    if first < n:
        w = torch.linalg.solve_triangular(system, k_beta * cum.exp()[..., None], upper=False,
                                          unitriangular=True)
        q_decayed = q * cum.exp()[..., None]
    for c in range(first, n):
        v_new = u[:, :, c] - w[:, :, c] @ S  # what the old state does not already predict
        out[:, :, c] = q_decayed[:, :, c] @ S + attn[:, :, c] @ v_new
        S = S * chunk_decay[:, :, c] + k_to_end[:, :, c].transpose(-1, -2) @ v_new
    out = out.reshape(B, H, n * C, -1)[:, :, :T]
    return out.transpose(1, 2).to(out_dtype), S


def gated_delta_rule_step(q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
                          state: Tensor) -> tuple[Tensor, Tensor]:
    """One token of the recurrence, written as broadcasts and sums rather than matmuls so that a
    compiler fuses it into a pass or two over S (the compiled decode step). q, k [B, H, K], v [B, H, V],
    g, beta [B, H]; returns o [B, H, V] (dtype of v) and the new state [B, H, K, V] float32."""
    out_dtype = v.dtype
    q, k, v = q.float() * q.shape[-1] ** -0.5, k.float(), v.float()
    S = state.float() * g.float().exp()[..., None, None]
    delta = beta.float()[..., None] * (v - (k[..., None] * S).sum(-2))  # [B, H, V]
    S = S + k[..., None] * delta[..., None, :]
    return (q[..., None] * S).sum(-2).to(out_dtype), S
