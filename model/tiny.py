"""make_tiny_model: a small, deterministic random-weight checkpoint in the real Hugging Face format
(hub-layout config.json, per-expert safetensors names, optional shards, a byte-level BPE tokenizer)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from model.config import DTYPES
from model.weights import INDEX_FILE

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END)
BPE_VOCAB_SIZE = 480  # 256 byte symbols + 224 merges; the special tokens follow, as in Qwen's vocab
# Qwen2's pre-tokenizer split, so that transformers' Qwen2Tokenizer (which rebuilds the pipeline
# from vocab and merges) and the `tokenizers` file agree token for token.
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Tags Qwen3's vocabulary has as single (non-special) added tokens: they survive decoding with
# skip_special_tokens, so the chat API's parsers see them, as with a real Qwen3 checkpoint.
TAG_TOKENS = ("<tool_call>", "</tool_call>", "<think>", "</think>", "<tool_response>", "</tool_response>")
# Renders what Qwen3's own template renders (same text for the same conversation): tools listed
# in the system turn, past calls as <tool_call> JSON, tool results as <tool_response> in a user
# turn, reasoning kept only for the turns after the last user query, and enable_thinking=false
# closing an empty <think> block in the generation prompt.
CHAT_TEMPLATE = r"""{%- set ns = namespace(last_query=messages|length - 1, seeking=true) %}
{%- for message in messages[::-1] %}
    {%- set text = message.content if message.content is string else '' %}
    {%- if ns.seeking and message.role == 'user'
          and not (text.startswith('<tool_response>') and text.endswith('</tool_response>')) %}
        {%- set ns.seeking = false %}
        {%- set ns.last_query = messages|length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\n' }}
    {{- 'You are provided with function signatures within <tools></tools> XML tags:\n<tools>' }}
    {%- for tool in tools %}
        {{- '\n' + tool | tojson }}
    {%- endfor %}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments '
        'within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
        '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n' }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- set content = message.content if message.content is string else '' %}
    {%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>\n' }}
    {%- elif message.role == 'assistant' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning = message.reasoning_content %}
        {%- elif '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\n') %}
        {%- else %}
            {%- set reasoning = '' %}
        {%- endif %}
        {{- '<|im_start|>assistant\n' }}
        {%- if loop.index0 > ns.last_query and (loop.last or reasoning) %}
            {{- '<think>\n' + reasoning.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
        {%- else %}
            {{- content }}
        {%- endif %}
        {%- for call in message.tool_calls or [] %}
            {%- if content or not loop.first %}
                {{- '\n' }}
            {%- endif %}
            {%- set call = call.function if call.function else call %}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' }}
            {{- call.arguments if call.arguments is string else call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' + content + '\n</tool_response>' }}
        {%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

TINY_NEXT: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=4, full_attention_interval=4, num_attention_heads=4,
    num_key_value_heads=2, head_dim=32, partial_rotary_factor=0.25, rope_theta=10_000_000,
    rope_scaling=None, linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
    linear_value_head_dim=16, linear_conv_kernel_dim=4, num_experts=16, num_experts_per_tok=4,
    norm_topk_prob=True, moe_intermediate_size=32, shared_expert_intermediate_size=32,
    intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[],
)
TINY_MOE: dict[str, Any] = dict(
    hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    rope_theta=1_000_000.0, rope_scaling=None, num_experts=8, num_experts_per_tok=2, norm_topk_prob=False,
    moe_intermediate_size=32, intermediate_size=128, decoder_sparse_step=1, mlp_only_layers=[],
    use_sliding_window=False, sliding_window=None, max_window_layers=4,
)
ARCHS = {"qwen3_next": ("Qwen3NextForCausalLM", TINY_NEXT), "qwen3_moe": ("Qwen3MoeForCausalLM", TINY_MOE)}


def make_tiny_model(path: str | Path, arch: str = "qwen3_next", seed: int = 0, dtype: str = "float32",
                    max_shard_bytes: int | None = None, overrides: dict[str, Any] | None = None) -> Path:
    """Write the checkpoint to `path` (replacing an earlier one there) and return `path`. The same
    (arch, seed, dtype, max_shard_bytes, overrides) gives byte-identical files; the shard size never
    changes the values. `overrides` replaces hub config.json keys the arch already has (sizes, head
    counts, layers, ...: e.g. a wider model for benchmarks); the tensors follow the new config.
    Everything is written to a temporary directory first and moved in with config.json last, so an
    interrupted write never leaves a directory that looks complete."""
    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r} is not one of {sorted(ARCHS)}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    tokenizer = build_tokenizer()
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL_TOKENS + TAG_TOKENS}
    vocab_size = 64 * math.ceil(tokenizer.get_vocab_size() / 64)  # padded rows, like Qwen's 151936
    config = hub_config(arch, vocab_size=vocab_size, ids=ids, dtype=dtype)
    if overrides:
        # architectures, model_type and torch_dtype follow `arch` and `dtype`; vocab_size the tokenizer
        fixed = {"architectures", "model_type", "torch_dtype", "vocab_size"}
        bad = sorted(set(overrides) - (set(config) - fixed))
        if bad:
            raise ValueError(f"overrides {bad}: not {arch} config keys that can be overridden")
        config.update(overrides)
    tensors = random_tensors(tensor_shapes(config), config, seed, DTYPES[dtype])

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        _write_weights(tmp, tensors, max_shard_bytes)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _write_json(tmp / "tokenizer_config.json", tokenizer_config(ids))
        _write_json(tmp / "generation_config.json", {
            "bos_token_id": ids[ENDOFTEXT], "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
            "pad_token_id": ids[ENDOFTEXT]})
        _write_json(tmp / "config.json", config)
        _install(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


def hub_config(arch: str, vocab_size: int, ids: dict[str, int], dtype: str) -> dict[str, Any]:
    """config.json as published on the hub: top-level rope keys, no layer_types, torch_dtype."""
    architecture, dims = ARCHS[arch]
    return {
        "architectures": [architecture], "model_type": arch, "vocab_size": vocab_size, **dims,
        "hidden_act": "silu", "attention_bias": False, "attention_dropout": 0.0, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096, "tie_word_embeddings": False, "initializer_range": 0.02,
        "router_aux_loss_coef": 0.001, "output_router_logits": False, "use_cache": True,
        "bos_token_id": ids[ENDOFTEXT], "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
        "torch_dtype": dtype,
    }


def tensor_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the checkpoint with its shape, in a fixed order: model, then mtp.*."""
    H, V = config["hidden_size"], config["vocab_size"]
    is_next = config["model_type"] == "qwen3_next"
    shapes = {"model.embed_tokens.weight": (V, H)}
    for i in range(config["num_hidden_layers"]):
        full = not is_next or (i + 1) % config["full_attention_interval"] == 0
        shapes.update(_layer_shapes(f"model.layers.{i}.", config, full))
    shapes["model.norm.weight"] = (H,)
    shapes["lm_head.weight"] = (V, H)
    if is_next:  # one MTP layer, as in Qwen3-Next's hub checkpoints (vLLM's names)
        shapes["mtp.fc.weight"] = (H, 2 * H)
        for norm in ("pre_fc_norm_embedding", "pre_fc_norm_hidden", "norm"):
            shapes[f"mtp.{norm}.weight"] = (H,)
        shapes.update(_layer_shapes("mtp.layers.0.", config, full=True))
    return shapes


def _layer_shapes(prefix: str, c: dict[str, Any], full: bool) -> Iterator[tuple[str, tuple[int, ...]]]:
    H, is_next = c["hidden_size"], c["model_type"] == "qwen3_next"
    yield prefix + "input_layernorm.weight", (H,)
    if full:
        heads, kv, hd = c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        a = prefix + "self_attn."
        yield a + "q_proj.weight", (heads * hd * (2 if is_next else 1), H)  # Qwen3-Next: + output gate
        yield a + "k_proj.weight", (kv * hd, H)
        yield a + "v_proj.weight", (kv * hd, H)
        yield a + "o_proj.weight", (H, heads * hd)
        yield a + "q_norm.weight", (hd,)
        yield a + "k_norm.weight", (hd,)
    else:
        hk, hv = c["linear_num_key_heads"], c["linear_num_value_heads"]
        key_dim, value_dim = hk * c["linear_key_head_dim"], hv * c["linear_value_head_dim"]
        a = prefix + "linear_attn."
        yield a + "in_proj_qkvz.weight", (2 * key_dim + 2 * value_dim, H)
        yield a + "in_proj_ba.weight", (2 * hv, H)
        yield a + "conv1d.weight", (2 * key_dim + value_dim, 1, c["linear_conv_kernel_dim"])
        yield a + "A_log", (hv,)
        yield a + "dt_bias", (hv,)
        yield a + "norm.weight", (c["linear_value_head_dim"],)
        yield a + "out_proj.weight", (H, value_dim)
    yield prefix + "post_attention_layernorm.weight", (H,)
    m, inter = prefix + "mlp.", c["moe_intermediate_size"]
    yield m + "gate.weight", (c["num_experts"], H)
    for e in range(c["num_experts"]):
        yield from _mlp_shapes(f"{m}experts.{e}.", H, inter)
    if c.get("shared_expert_intermediate_size"):
        yield from _mlp_shapes(m + "shared_expert.", H, c["shared_expert_intermediate_size"])
        yield m + "shared_expert_gate.weight", (1, H)


def _mlp_shapes(prefix: str, H: int, inter: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    yield prefix + "gate_proj.weight", (inter, H)
    yield prefix + "up_proj.weight", (inter, H)
    yield prefix + "down_proj.weight", (H, inter)


def random_tensors(shapes: dict[str, tuple[int, ...]], config: dict[str, Any], seed: int,
                   dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Values drawn in float32 from one generator in `shapes` order, then cast. Scales are chosen
    so that every block matters and greedy tokens win by clear margins (HF's init leaves norms at
    identity and most signals tiny, which makes near-ties everywhere)."""
    g = torch.Generator().manual_seed(seed)
    # Qwen3-Next stores its RMSNorm weights around 0 (it scales by 1 + w); Qwen3 MoE around 1.
    norm_centre = 0.0 if config["model_type"] == "qwen3_next" else 1.0
    out = {}
    for name, shape in shapes.items():
        if name.endswith("A_log"):
            t = torch.empty(shape).uniform_(1, 16, generator=g).log()
        elif name.endswith("dt_bias"):
            t = torch.rand(shape, generator=g)
        elif name.endswith("linear_attn.norm.weight"):  # gated norm: plain w even in Qwen3-Next
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif "norm" in name:
            t = norm_centre + 0.1 * torch.randn(shape, generator=g)
        elif "conv1d" in name:
            t = 0.3 * torch.randn(shape, generator=g)
        else:
            scale = 2.0 if name == "lm_head.weight" else 1.0
            t = scale / math.sqrt(shape[-1]) * torch.randn(shape, generator=g)
        out[name] = t.to(dtype).contiguous()
    return out


def shard_plan(tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> list[list[str]]:
    """Greedy packing like transformers' save_pretrained, but by whole layers: a layer is split
    only when it alone is larger than a shard, so small shards never mix two layers' experts."""
    if max_shard_bytes is None:
        return [list(tensors)]
    nbytes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    groups: dict[str, list[str]] = {}
    for name in tensors:
        groups.setdefault(_layer_of(name), []).append(name)
    shards: list[list[str]] = [[]]
    size = 0
    for group in groups.values():
        if shards[-1] and size + sum(nbytes[n] for n in group) > max_shard_bytes:
            shards.append([])
            size = 0
        for name in group:
            if shards[-1] and size + nbytes[name] > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(name)
            size += nbytes[name]
    return shards


def _layer_of(name: str) -> str:
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        return ".".join(parts[:3])
    return "mtp" if parts[0] == "mtp" else name


def _write_weights(path: Path, tensors: dict[str, torch.Tensor], max_shard_bytes: int | None) -> None:
    shards = shard_plan(tensors, max_shard_bytes)
    if len(shards) == 1:  # as transformers does: one file needs no index
        save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, names in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in names}, str(path / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(names, file))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(path / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})


def byte_level_bpe() -> Tokenizer:
    """Qwen2's byte-level BPE pipeline (NFC, its pre-tokenizing regex, byte-level), untrained."""
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def build_tokenizer() -> Tokenizer:
    """Qwen2's byte-level BPE pipeline, trained on the built-in text (deterministic: the trainer
    breaks count ties by pair order), with the ChatML special tokens after the BPE vocab."""
    tok = byte_level_bpe()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB_SIZE, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS.split("\n\n"), trainer=trainer)
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tok


def tokenizer_config(ids: dict[str, int]) -> dict[str, Any]:
    added = {str(ids[t]): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": t in SPECIAL_TOKENS} for t in ids}
    return {
        "tokenizer_class": "Qwen2Tokenizer", "added_tokens_decoder": added, "bos_token": None,
        "eos_token": IM_END, "pad_token": ENDOFTEXT, "unk_token": None, "chat_template": CHAT_TEMPLATE,
        "model_max_length": 4096, "add_prefix_space": False, "clean_up_tokenization_spaces": False,
        "errors": "replace", "split_special_tokens": False,
    }


def _write_json(file: Path, obj: Any) -> None:
    file.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _install(tmp: Path, path: Path) -> None:
    """Move the new files into `path` after removing an earlier checkpoint's weights there (a
    stale shard would shadow or duplicate tensors); config.json last marks the copy complete."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").unlink(missing_ok=True)
    for old in [*path.glob("*.safetensors"), path / INDEX_FILE]:
        old.unlink(missing_ok=True)
    for file in sorted(tmp.iterdir(), key=lambda f: f.name == "config.json"):
        file.chmod(0o644)  # safetensors writes 0600; a checkpoint is meant to be shared
        os.replace(file, path / file.name)


CORPUS = """\
The lighthouse stood at the end of a long stone pier, and every evening the keeper climbed its one
hundred and twelve steps to light the lamp. She had done this for nine years. The work was simple,
but it was never the same twice: the wind changed, the sea changed, and the ships that passed in the
night were always new.

Hello! How are you today? I am fine, thank you. What would you like to talk about? We could talk
about the weather, about books, about music, or about the way a small model learns to speak.

A language model reads text one token at a time. Each token is a piece of a word, a whole word, a
number, or a mark of punctuation. The model looks at the tokens it has seen so far and guesses which
token comes next. When it guesses well, the text it writes is clear and useful; when it guesses
badly, the text wanders.

In the morning the market opened early. There were apples and pears, bread still warm from the oven,
cheese, fish, fresh eggs, and flowers of every colour. People came from the nearby villages with
baskets and carts. The baker counted his loaves: one, two, three, four, five, six, seven, eight,
nine, ten. By noon most of them were gone.

The answer is simple: start small, test everything, and make each step easy to check. A good
engineer writes the plain version first, then the fast one, and keeps both so that one can be
compared with the other. If the two disagree, the plain version is usually right.

Water boils at 100 degrees at sea level and freezes at 0. The year has 365 days, or 366 in a leap
year. A week has 7 days, a day has 24 hours, an hour has 60 minutes, and a minute has 60 seconds. In
2024 there were many clear nights for watching the stars.

She asked the old captain what he remembered of the great storm. "The waves were higher than the
mast," he said, "and the wind sang in the ropes like a choir. We held on and we did not sleep. In
the morning the sky was blue again, as if nothing had happened."

Please write a short story about a cat who wants to become a sailor. Once upon a time there was a
cat named Pepper who lived near the harbour. Every day she watched the boats go out and come back,
and every day she wished that she could go with them. One morning she hid in a coil of rope on a
fishing boat, and when the boat left the harbour, Pepper was on board.

The train left the city at half past six. Through the window the passengers saw fields, rivers,
small towns, and then the mountains, white with snow. A child counted the tunnels. There were eleven
of them, and the longest took almost three minutes to pass through.

Good questions are short and precise. What is the capital of France? Paris is the capital of France.
What is two plus two? Two plus two is four. Which is larger, the sun or the moon? The sun is much
larger than the moon, but the moon is much closer to us.

To make bread you need flour, water, salt, and yeast. Mix them together, knead the dough until it is
smooth, and let it rise in a warm place. Then shape the loaf, let it rise again, and bake it in a
hot oven until the crust is brown and the bottom sounds hollow when you tap it.

The library was quiet except for the turning of pages. On the shelves there were books about history
and science, about the sea and the sky, about people who lived long ago and people who have not yet
been born. A student wrote notes in a small blue notebook and smiled when she found what she was
looking for.

Thank you for your help. You are welcome! Is there anything else I can do for you? No, that is all
for now. Goodbye, and have a nice day.
"""
