"""model/mtp.py against a hand-written reference of Qwen3-Next's MTP wiring (spec §5, vLLM's
Qwen3NextMultiTokenPredictor), computed straight from the checkpoint's tensors: fc over
[pre_fc_norm_embedding(embed(t_{i+1})) ; pre_fc_norm_hidden(h_i)], one full-attention MoE layer,
mtp.norm, the shared lm_head. Plus the proposer's cache handling, and the shipped trained model."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model.batch import BatchLayout
from model.decoder import CausalLM
from model.mtp import MTPProposer, MultiTokenPredictor
from model.tiny import make_tiny_model
from model.weights import CheckpointError

REL_TOL = 1e-4
BUILTIN = Path(__file__).resolve().parents[2] / "models" / "tiny-qwen3-next"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("mtp") / "m", seed=3)
    lm = CausalLM.from_pretrained(path, dtype="float32")
    return path, lm, MTPProposer.from_pretrained(lm, path)


def close(ours: torch.Tensor, ref: torch.Tensor, rel: float = REL_TOL) -> None:
    err = (ours - ref).abs().max().item()
    scale = ref.abs().max().item()
    assert err <= rel * scale, f"max abs diff {err:.3g} > {rel:g} x {scale:.3g}"


# -- the reference: plain loops over the checkpoint's tensors -------------------------------------

def _rms(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * (1.0 + w)  # zero-centred


def _rope(x: torch.Tensor, pos: torch.Tensor, rotary_dim: int, theta: float) -> torch.Tensor:
    """x [T, heads, D]; rotate_half over the first rotary_dim dims of each head."""
    inv = 1.0 / theta ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim)
    freqs = pos[:, None].float() * inv[None]
    cos, sin = torch.cat([freqs, freqs], -1).cos()[:, None], torch.cat([freqs, freqs], -1).sin()[:, None]
    xr, xp = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rot = torch.cat([-xr[..., half:], xr[..., :half]], -1)
    return torch.cat([xr * cos + rot * sin, xp], -1)


def _attention(x: torch.Tensor, pos: torch.Tensor, w: dict, c: dict, p: str) -> torch.Tensor:
    T, N, Nkv, D = x.shape[0], c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
    qg = (x @ w[p + "q_proj.weight"].T).view(T, N, 2 * D)  # per head: [q | gate]
    q, gate = qg[..., :D], qg[..., D:].reshape(T, N * D)
    k = (x @ w[p + "k_proj.weight"].T).view(T, Nkv, D)
    v = (x @ w[p + "v_proj.weight"].T).view(T, Nkv, D)
    rd = int(D * c["partial_rotary_factor"])
    q = _rope(_rms(q, w[p + "q_norm.weight"]), pos, rd, c["rope_theta"])
    k = _rope(_rms(k, w[p + "k_norm.weight"]), pos, rd, c["rope_theta"])
    o = torch.zeros(T, N, D)
    for n in range(N):
        g = n // (N // Nkv)
        for t in range(T):
            scores = (k[: t + 1, g] @ q[t, n]) / math.sqrt(D)
            o[t, n] = torch.softmax(scores, 0) @ v[: t + 1, g]
    return (o.reshape(T, N * D) * torch.sigmoid(gate)) @ w[p + "o_proj.weight"].T


def _swiglu(x: torch.Tensor, w: dict, p: str) -> torch.Tensor:
    gate, up = x @ w[p + "gate_proj.weight"].T, x @ w[p + "up_proj.weight"].T
    return (F.silu(gate) * up) @ w[p + "down_proj.weight"].T


def _moe(x: torch.Tensor, w: dict, c: dict, p: str) -> torch.Tensor:
    probs = torch.softmax(x @ w[p + "gate.weight"].T, -1)
    top, ids = probs.topk(c["num_experts_per_tok"], -1)
    top = top / top.sum(-1, keepdim=True)  # norm_topk_prob
    out = torch.stack([sum(top[t, j] * _swiglu(x[t], w, f"{p}experts.{int(ids[t, j])}.")
                           for j in range(ids.shape[1])) for t in range(x.shape[0])])
    return out + torch.sigmoid(x @ w[p + "shared_expert_gate.weight"].T) * _swiglu(x, w, p + "shared_expert.")


def reference_mtp(w: dict, c: dict, next_ids: torch.Tensor, hidden: torch.Tensor,
                  positions: torch.Tensor) -> torch.Tensor:
    """Draft logits for every position of one sequence whose MTP inputs are (next_ids, hidden)."""
    x = torch.cat([_rms(w["model.embed_tokens.weight"][next_ids], w["mtp.pre_fc_norm_embedding.weight"]),
                   _rms(hidden, w["mtp.pre_fc_norm_hidden.weight"])], -1) @ w["mtp.fc.weight"].T
    p = "mtp.layers.0."
    h = x + _attention(_rms(x, w[p + "input_layernorm.weight"]), positions, w, c, p + "self_attn.")
    h = h + _moe(_rms(h, w[p + "post_attention_layernorm.weight"]), w, c, p + "mlp.")
    return _rms(h, w["mtp.norm.weight"]) @ w["lm_head.weight"].T


def target_hidden(lm: CausalLM, ids: torch.Tensor) -> torch.Tensor:
    layout = BatchLayout.build([0], [0], [len(ids)])
    return lm(ids, layout, lm.make_caches(1, len(ids) + 8))


# -- tests ---------------------------------------------------------------------------------------

def test_mtp_logits_match_reference_wiring(tiny):
    path, lm, proposer = tiny
    w, c = load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())
    ids = torch.randint(0, 400, (24,), generator=torch.Generator().manual_seed(0))
    hidden = target_hidden(lm, ids)  # after model.norm: what the MTP takes
    n = len(ids) - 1
    layout = BatchLayout.build([0], [0], [n])
    ours = lm.compute_logits(proposer.step(ids[1:], hidden[:-1], layout, proposer.make_cache(1, 64)))
    close(ours, reference_mtp(w, c, ids[1:], hidden[:-1], torch.arange(n)))


def test_mtp_uses_embedding_first_and_normed_hidden(tiny):
    """Swapping the fc's halves or feeding the pre-norm hidden state changes the drafts: the
    reference above would not catch a wiring that is symmetric by accident."""
    path, lm, _ = tiny
    w, c = load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())
    ids = torch.randint(0, 400, (12,), generator=torch.Generator().manual_seed(1))
    hidden = target_hidden(lm, ids)
    ref = reference_mtp(w, c, ids[1:], hidden[:-1], torch.arange(11))
    swapped = dict(w)
    H = c["hidden_size"]
    swapped["mtp.fc.weight"] = torch.cat([w["mtp.fc.weight"][:, H:], w["mtp.fc.weight"][:, :H]], 1)
    assert (reference_mtp(swapped, c, ids[1:], hidden[:-1], torch.arange(11)) - ref).abs().max() > 1e-2


def test_chunked_and_incremental_match_one_pass(tiny):
    """The MTP's own KV cache: a prompt in two chunks, then one token at a time, in a paged cache
    with scattered blocks, gives the logits of one pass over everything."""
    _, lm, proposer = tiny
    ids = torch.randint(0, 400, (40,), generator=torch.Generator().manual_seed(2))
    hidden = target_hidden(lm, ids)
    full = lm.compute_logits(proposer.step(ids[1:], hidden[:-1], BatchLayout.build([0], [0], [39]),
                                           proposer.make_cache(1, 64)))
    table = [[7, 2, 9, 0, 4, 11, 5, 1, 3, 8]]  # 10 blocks of 4 tokens, out of order
    cache = proposer.make_cache(1, 64, block_size=4, num_blocks=12)
    parts = []
    for start, end in [(0, 20), (20, 33), *((t, t + 1) for t in range(33, 39))]:
        layout = BatchLayout.build([0], [start], [end - start], block_tables=table)
        out = proposer.step(ids[start + 1:end + 1], hidden[start:end], layout, cache)
        parts.append(lm.compute_logits(out))
    close(torch.cat(parts), full)


def test_propose_chains_drafts_as_the_reference(tiny):
    """k drafts: draft j+1 takes the MTP's own output as h and draft j as the token, one position
    on; two sequences at different lengths in one batch."""
    path, lm, proposer = tiny
    w, c = load_file(str(path / "model.safetensors")), json.loads((path / "config.json").read_text())
    seqs = [torch.randint(0, 400, (n,), generator=torch.Generator().manual_seed(n)) for n in (9, 15)]
    hiddens = [target_hidden(lm, s) for s in seqs]
    nexts = [torch.tensor([5]), torch.tensor([77])]  # the token each sequence just sampled
    layout = BatchLayout.build([1, 0], [0, 0], [9, 15])
    next_ids = torch.cat([torch.cat([s[1:], n]) for s, n in zip(seqs, nexts, strict=True)])
    ids, logits = proposer.propose(torch.cat(hiddens), next_ids, layout, proposer.make_cache(2, 64), 3)
    assert ids.shape == (2, 3) and logits.shape == (2, 3, c["vocab_size"])
    for b, (s, h, n) in enumerate(zip(seqs, hiddens, nexts, strict=True)):
        toks, hs = list(torch.cat([s[1:], n])), list(h)
        for j in range(3):
            pos = torch.arange(len(toks))
            ref_logits = reference_mtp(w, c, torch.stack(toks), torch.stack(hs), pos)[-1]
            close(logits[b, j], ref_logits)
            assert int(ids[b, j]) == int(logits[b, j].argmax())
            # the MTP's normed output at the last position is the next draft's h
            out = proposer.step(torch.stack(toks), torch.stack(hs), BatchLayout.build([0], [0], [len(toks)]),
                                proposer.make_cache(1, 64))[-1]
            toks.append(ids[b, j])
            hs.append(out)


def test_zero_drafts_only_fill_the_cache(tiny):
    _, lm, proposer = tiny
    ids = torch.arange(10, 30)
    hidden = target_hidden(lm, ids)
    cache = proposer.make_cache(1, 64)
    drafts, logits = proposer.propose(hidden[:10], ids[1:11], BatchLayout.build([0], [0], [10]), cache, 0)
    assert drafts.shape == (1, 0) and logits.shape[:2] == (1, 0)
    with pytest.raises(ValueError, match="num_drafts"):
        proposer.propose(hidden[:10], ids[1:11], BatchLayout.build([0], [0], [10]), cache, -1)


def test_checkpoint_without_mtp_is_refused_by_name(tmp_path):
    path = make_tiny_model(tmp_path / "m")
    config = CausalLM.from_pretrained(path).config
    tensors = load_file(str(path / "model.safetensors"))
    tensors = {k: v for k, v in tensors.items() if not k.startswith("mtp.")}
    save_file(tensors, str(path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mtp\.fc\.weight"):
        MultiTokenPredictor.from_pretrained(path, config)
    moe = make_tiny_model(tmp_path / "moe", arch="qwen3_moe")
    with pytest.raises(ValueError, match="qwen3_moe"):
        MultiTokenPredictor.from_pretrained(moe, CausalLM.from_pretrained(moe).config)


def test_builtin_model_drafts_are_accepted():
    """The shipped trained model: its MTP head's first draft equals the target's greedy next
    token on most positions of held-out docstrings (bench/mtp_acceptance.py measures it in full)."""
    from bench.mtp_acceptance import teacher_forced_acceptance

    lm = CausalLM.from_pretrained(BUILTIN)
    proposer = MTPProposer.from_pretrained(lm, BUILTIN)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(BUILTIN / "tokenizer.json"))
    docs = (BUILTIN / "training" / "heldout.txt").read_text().split("<|endoftext|>\n")[:20]
    accepted, total = teacher_forced_acceptance(lm, proposer, [tok.encode(d).ids for d in docs if d.strip()])
    assert total > 500 and accepted / total >= 0.5


def test_propose_after_partial_acceptance_equals_a_fresh_pass(tiny):
    """The engine's cycle: draft 3, the target accepts 1 and adds its own token, the proposer runs
    over the 2 verified positions: the chained drafts' stale cache entries are rewritten, so the
    new drafts equal those of a fresh cache over the whole sequence."""
    _, lm, proposer = tiny
    seq = torch.randint(0, 400, (17,), generator=torch.Generator().manual_seed(5))
    P = 16  # prompt seq[:16]; seq[16] is the token the target just chose
    cache = proposer.make_cache(1, 64, block_size=4, num_blocks=16)
    table = [[3, 9, 1, 14, 6, 0, 11]]
    hidden = target_hidden(lm, seq)
    drafts, _ = proposer.propose(hidden[:P], seq[1:], BatchLayout.build([0], [0], [P], block_tables=table),
                                 cache, 3)
    bonus = torch.tensor([123])
    full = torch.cat([seq, drafts[0, :1], bonus])  # first draft accepted, then the target's token
    hidden = target_hidden(lm, full)
    layout = BatchLayout.build([0], [P], [2], block_tables=table)
    ids, logits = proposer.propose(hidden[P:P + 2], full[P + 1:P + 3], layout, cache, 2)
    fresh, fresh_cache = BatchLayout.build([0], [0], [P + 2]), proposer.make_cache(1, 64)
    fresh_ids, fresh_logits = proposer.propose(hidden[:P + 2], full[1:P + 3], fresh, fresh_cache, 2)
    close(logits, fresh_logits)
    assert ids.tolist() == fresh_ids.tolist()
