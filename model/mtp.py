"""Qwen3-Next's multi-token prediction (MTP) layer, `mtp.*` of a hub checkpoint, and the proposer
that drafts tokens with it for speculative decoding.

Wiring (vLLM `Qwen3NextMultiTokenPredictor`, ../shared/reference/qwen3_next_spec.md §5): for the
token at position i,
    x = fc(cat[pre_fc_norm_embedding(embed(t_{i+1})), pre_fc_norm_hidden(h_i)])   (embedding first)
    x = one full-attention MoE decoder layer (`mtp.layers.0.*`, its own KV cache, RoPE at position i)
    out = mtp.norm(x);   draft logits for t_{i+2} = lm_head(out)   (the target's shared lm_head)
where h_i is the target's hidden state as CausalLM returns it: after the final `model.norm`, and
embed is the target's shared `model.embed_tokens`. A second draft feeds `out` back in as h and the
first draft as the token, one position further on.

Legend: T packed tokens, B sequences, H hidden, V vocabulary, k drafts per sequence."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import Tensor, nn

from model.batch import BatchLayout
from model.cache import KVCache
from model.config import ModelConfig
from model.decoder import CausalLM, DecoderLayer
from model.loading import load_module, materialize
from model.norm import RMSNorm
from model.weights import CheckpointError, CheckpointReader

PREFIX = "mtp."


def mtp_layer_config(config: ModelConfig) -> ModelConfig:
    """The config with one more layer type, so that the MTP's decoder layer can be built at index
    num_hidden_layers (vLLM's layer index for it): full attention, and MoE by the same
    decoder_sparse_step / mlp_only_layers rule as the target's layers."""
    return dataclasses.replace(config, num_hidden_layers=config.num_hidden_layers + 1,
                               layer_types=(*config.layer_types, "full_attention"))


class MultiTokenPredictor(nn.Module):
    """The `mtp.*` tensors; parameter names below `mtp.` equal the checkpoint's. The embedding and
    LM head are the target's, passed in, never copied."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.arch != "qwen3_next":
            raise ValueError(f"MTP is a Qwen3-Next layer; this model is {config.arch}")
        c = config
        H = c.hidden_size
        self.config = config
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.pre_fc_norm_embedding = RMSNorm(H, c.rms_norm_eps, c.zero_centered_norm)
        self.pre_fc_norm_hidden = RMSNorm(H, c.rms_norm_eps, c.zero_centered_norm)
        self.layers = nn.ModuleList([DecoderLayer(mtp_layer_config(c), c.num_hidden_layers)])
        self.norm = RMSNorm(H, c.rms_norm_eps, c.zero_centered_norm)

    @classmethod
    def from_pretrained(cls, path: str | Path, config: ModelConfig,
                        device: torch.device | str = "cpu") -> MultiTokenPredictor:
        """Read `mtp.*` of the checkpoint at `path` in `config`'s dtype. A checkpoint without an
        MTP layer (num_nextn_predict_layers 0, or its tensors dropped) is refused by name."""
        if config.arch != "qwen3_next":
            raise ValueError(f"MTP is a Qwen3-Next layer; the checkpoint at {path} is {config.arch}")
        if config.num_mtp_layers < 1:
            raise CheckpointError(f"{path}: config.json num_nextn_predict_layers={config.num_mtp_layers}: "
                                  f"the checkpoint has no MTP layer")
        reader = CheckpointReader(path)
        if not reader.has(PREFIX + "fc.weight"):
            raise CheckpointError(f"tensor 'mtp.fc.weight' is not in checkpoint {path}: it has no MTP "
                                  f"layer to draft with")
        with torch.device("meta"):
            mtp = cls(config)
        materialize(mtp, device, config.torch_dtype)
        load_module(mtp, reader, prefix=PREFIX)
        reader.close()
        return mtp.eval()

    @property
    def layer(self) -> DecoderLayer:
        return self.layers[0]

    def make_cache(self, num_slots: int, max_len: int, block_size: int = 16,
                   num_blocks: int | None = None) -> KVCache:
        """The MTP layer's own paged KV cache. Token i's entry sits at position i, as the target's
        attention layers' do, so it takes the same block tables (no blocks of its own to count)."""
        p = self.fc.weight
        return self.layer.make_cache(num_slots, max_len, p.dtype, p.device, block_size, num_blocks)

    def forward(self, next_embeds: Tensor, hidden: Tensor, layout: BatchLayout, cache: KVCache) -> Tensor:
        """next_embeds [T, H]: embedding of the token after each packed token; hidden [T, H]: the
        target's final-normed hidden state at it -> the MTP's normed output [T, H] (lm_head of it:
        logits for the token after next). Writes the step's keys/values into `cache`. Not under
        inference_mode, so that training runs through this same code."""
        x = torch.cat([self.pre_fc_norm_embedding(next_embeds), self.pre_fc_norm_hidden(hidden)], dim=-1)
        return self.norm(self.layer(self.fc(x), layout, cache))


class MTPProposer:
    """Drafts k tokens per sequence with the MTP layer, for the engine's speculative decoding.

    Per engine step, after the target has run a step (layout L over tokens at positions
    start..start+n-1 of each sequence, hidden states `hidden` [T, H] from CausalLM.forward) and the
    engine has chosen each sequence's next token:

    - `propose(hidden, next_ids, L, cache, k)`: `next_ids` [T] is, for each packed token, the token
      that follows it (the sequence's own next token; for its last token, the one just sampled or
      accepted). Runs the MTP over all T tokens, which also fills the MTP's KV cache for them
      (prefill chunks included: a chunk that needs no draft still must go through, with k = 0),
      then k - 1 one-token steps on its own output. Returns draft ids [B, k] (greedy) and their
      logits [B, k, V] float32 (the draft distribution q for rejection sampling).
    - After verification, call `propose` again with the layout of the positions the target just
      verified, cut to the accepted ones: entries the drafts wrote past them are stale and are
      rewritten before any query can see them (attention reads only up to a sequence's end).

    The cache comes from `make_cache` and takes the target's block tables (same positions), so
    the block manager needs no accounting of its own beyond the k draft positions it reserves."""

    def __init__(self, lm: CausalLM, mtp: MultiTokenPredictor) -> None:
        self.lm, self.mtp = lm, mtp

    @classmethod
    def from_pretrained(cls, lm: CausalLM, path: str | Path) -> MTPProposer:
        return cls(lm, MultiTokenPredictor.from_pretrained(path, lm.config, device=lm.lm_head.weight.device))

    def make_cache(self, num_slots: int, max_len: int, block_size: int = 16,
                   num_blocks: int | None = None) -> KVCache:
        return self.mtp.make_cache(num_slots, max_len, block_size, num_blocks)

    @torch.inference_mode()
    def step(self, next_ids: Tensor, hidden: Tensor, layout: BatchLayout, cache: KVCache) -> Tensor:
        """One MTP pass over the step's tokens: [T, H] normed outputs (lm_head -> logits)."""
        return self.mtp(self.lm.model.embed_tokens(next_ids), hidden, layout, cache)

    @torch.inference_mode()
    def propose(self, hidden: Tensor, next_ids: Tensor, layout: BatchLayout, cache: KVCache,
                num_drafts: int) -> tuple[Tensor, Tensor]:
        """-> draft ids [B, k] long, draft logits [B, k, V] float32 (k = num_drafts >= 0)."""
        if num_drafts < 0:
            raise ValueError(f"num_drafts must be >= 0, got {num_drafts}")
        if next_ids.shape[0] != layout.num_tokens or hidden.shape[0] != layout.num_tokens:
            raise ValueError(f"next_ids {tuple(next_ids.shape)} and hidden {tuple(hidden.shape)} need one "
                             f"row per packed token of the layout ({layout.num_tokens})")
        out = self.step(next_ids, hidden, layout, cache)
        B, V = layout.num_seqs, self.lm.lm_head.weight.shape[0]
        ids = torch.empty(B, num_drafts, dtype=torch.long, device=hidden.device)
        logits = torch.empty(B, num_drafts, V, dtype=torch.float32, device=hidden.device)
        if num_drafts == 0:
            return ids, logits
        h = out[layout.last_token_index()]  # [B, H]
        ends = layout.starts + layout.lengths  # [B] position of the first draft's input
        for j in range(num_drafts):
            logits[:, j] = self.lm.compute_logits(h)
            ids[:, j] = logits[:, j].argmax(-1)
            if j + 1 == num_drafts:
                break
            # The next draft: the MTP's own output as h, the draft just made as the token.
            draft_layout = BatchLayout(
                slots=layout.slots, starts=ends + j, lengths=torch.ones_like(ends),
                positions=ends + j, pad_index=torch.arange(B, device=ends.device)[:, None],
                valid=torch.ones(B, 1, dtype=torch.bool, device=ends.device),
                block_tables=layout.block_tables)
            h = self.step(ids[:, j], h, draft_layout, cache)
        return ids, logits
