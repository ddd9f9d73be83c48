"""The decoder of both architectures: embedding, a stack of (token mixer + feed-forward)
layers, final norm and LM head. Module names equal the checkpoint's tensor names, so loading
is a lookup; a layer can be built alone (for one actor) with any subset of its experts."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from model.attention import Attention
from model.batch import BatchLayout
from model.cache import DeltaNetState, KVCache
from model.config import ModelConfig
from model.fp8 import resolve_fp8_kernels
from model.gated_deltanet import GatedDeltaNet
from model.loading import fp8_mode, keep_fp8, load_module, materialize
from model.moe import MLP, SparseMoeBlock
from model.norm import RMSNorm
from model.weights import CheckpointReader

Cache = KVCache | DeltaNetState


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, index: int, expert_ids: Sequence[int] | None = None) -> None:
        """`expert_ids`: the routed experts this copy holds (None: all of them, []: none)."""
        super().__init__()
        c = config
        self.index = index
        self.kind = c.layer_types[index]
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm)
        if self.kind == "full_attention":
            self.self_attn = Attention(c)
        else:
            self.linear_attn = GatedDeltaNet(c)
        self.mlp: SparseMoeBlock | MLP
        if c.is_moe_layer(index):
            self.mlp = SparseMoeBlock(c, expert_ids)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size)

    @property
    def mixer(self) -> Attention | GatedDeltaNet:
        return self.self_attn if self.kind == "full_attention" else self.linear_attn

    def make_cache(self, num_slots: int, max_len: int, dtype: torch.dtype, device: torch.device | str,
                   block_size: int = 16, num_blocks: int | None = None) -> Cache:
        """A paged KV cache (`num_blocks` None: room for every slot at `max_len`) for attention,
        a per-slot state for DeltaNet."""
        if isinstance(self.mixer, Attention):
            return self.mixer.make_cache(num_slots, max_len, dtype, device, block_size, num_blocks)
        return self.mixer.make_state(num_slots, dtype, device)

    def mix(self, h: Tensor, layout: BatchLayout, cache: Cache) -> Tensor:
        return h + self.mixer(self.input_layernorm(h), layout, cache)

    def feed_forward(self, h: Tensor) -> Tensor:
        return h + self.mlp(self.post_attention_layernorm(h))

    def forward(self, h: Tensor, layout: BatchLayout, cache: Cache) -> Tensor:
        return self.feed_forward(self.mix(h, layout, cache))


class DecoderStack(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.zero_centered_norm)


class CausalLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | None = None,
                        device: torch.device | str = "cpu", fp8: str = "auto") -> CausalLM:
        """`fp8` (block-wise FP8 checkpoints): "dequantize" at load, "keep" the FP8 weights and
        scales in memory (model/fp8.py), or "auto": keep on CUDA, dequantize elsewhere."""
        config = ModelConfig.from_dir(path, dtype=dtype)
        with torch.device("meta"):
            lm = cls(config)
        reader = CheckpointReader(path)
        keep = fp8_mode(fp8, device) == "keep" and config.quantization is not None
        if keep:
            keep_fp8(lm, reader, prefix="", dtype=config.torch_dtype)
        materialize(lm, device, config.torch_dtype)
        if keep:
            resolve_fp8_kernels(lm, config.torch_dtype)
        skip = ("lm_head.weight",) if config.tie_word_embeddings else ()
        load_module(lm, reader, prefix="", skip=skip)
        if config.tie_word_embeddings:
            lm.lm_head.weight = lm.model.embed_tokens.weight
        return lm.eval()

    def make_caches(self, num_slots: int, max_len: int, block_size: int = 16,
                    num_blocks: int | None = None) -> list[Cache]:
        p = self.lm_head.weight
        return [layer.make_cache(num_slots, max_len, p.dtype, p.device, block_size, num_blocks)
                for layer in self.model.layers]

    @torch.inference_mode()
    def forward(self, token_ids: Tensor, layout: BatchLayout, caches: Sequence[Cache]) -> Tensor:
        """token_ids [T] -> final-normed hidden states [T, H]."""
        h = self.model.embed_tokens(token_ids)
        for layer, cache in zip(self.model.layers, caches, strict=True):
            h = layer(h, layout, cache)
        return self.model.norm(h)

    @torch.inference_mode()
    def compute_logits(self, hidden: Tensor) -> Tensor:
        return self.lm_head(hidden).float()
