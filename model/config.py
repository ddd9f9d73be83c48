"""ModelConfig: one frozen description of a Qwen3-Next or Qwen3 MoE decoder, read from an
unmodified Hugging Face config.json in either the hub layout or the transformers-5 layout."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ARCHITECTURES = {
    "Qwen3NextForCausalLM": "qwen3_next",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
LAYER_TYPES = ("full_attention", "linear_attention")
ROPE_TYPES = ("default", "linear", "yarn")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ConfigError(ValueError):
    """A config.json that this decoder cannot run; the message names the field."""


@dataclass(frozen=True)
class QuantConfig:
    """`quantization_config` of a block-wise FP8 checkpoint (quant_method fp8, DeepSeek-V3 /
    Qwen3 "-FP8" layout): a converted Linear's `weight` is float8_e4m3fn and `weight_scale_inv`
    holds one float32 scale per [block[0], block[1]] tile (edge tiles may be smaller), by which
    the tile is multiplied to dequantize. `modules_to_not_convert` are kept unquantized."""

    method: str  # "fp8"
    block: tuple[int, int]  # weight_block_size: (output rows, input columns) per scale
    modules_to_not_convert: tuple[str, ...] = ()
    activation_scheme: str = "dynamic"

    def converts(self, module: str) -> bool:
        """Whether `module` (a full module name, e.g. model.layers.0.mlp.gate) is quantized, by
        transformers' rule: a pattern matches from the start up to a module boundary, as a
        regex with that boundary, or as a suffix."""
        boundary = r"(?:(?<=\.)|(?=\.|$))"
        return not any(re.match(rf"(?:{p}){boundary}", module) or module.endswith(p)
                       for p in self.modules_to_not_convert)


@dataclass(frozen=True)
class RopeConfig:
    theta: float
    rotary_dim: int  # leading dims of each head that rotate (partial rotary)
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True


@dataclass(frozen=True)
class ModelConfig:
    arch: str  # "qwen3_next" | "qwen3_moe"
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeConfig
    max_position_embeddings: int
    rms_norm_eps: float
    # Qwen3-Next: zero-centred norms x·(1+w), a sigmoid output gate packed into q_proj.
    zero_centered_norm: bool
    attn_output_gate: bool
    attention_bias: bool
    # Gated DeltaNet (Qwen3-Next only)
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    # MoE
    num_experts: int
    num_experts_per_tok: int
    norm_topk_prob: bool
    moe_intermediate_size: int
    shared_expert_intermediate_size: int  # 0: no shared expert
    intermediate_size: int  # dense MLP of mlp_only_layers
    decoder_sparse_step: int
    mlp_only_layers: tuple[int, ...]
    tie_word_embeddings: bool
    dtype: str
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_mtp_layers: int = 0
    quantization: QuantConfig | None = None  # None: plain float weights
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        # Sizes first: a zero or negative one would otherwise surface as a torch error deep in loading.
        for key in ("num_hidden_layers", "hidden_size", "vocab_size", "num_attention_heads",
                    "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            _check(isinstance(value, int) and value > 0, key, value)
        _check(len(self.layer_types) == self.num_hidden_layers, "layer_types",
               f"{len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        for lt in self.layer_types:
            _check(lt in LAYER_TYPES, "layer_types", f"{lt!r} (expected one of {LAYER_TYPES})")
        _check(self.num_attention_heads % self.num_key_value_heads == 0, "num_key_value_heads",
               f"{self.num_key_value_heads} does not divide num_attention_heads={self.num_attention_heads}")
        _check(self.rope.rotary_dim % 2 == 0 and 0 < self.rope.rotary_dim <= self.head_dim,
               "partial_rotary_factor", f"rotary dim {self.rope.rotary_dim} for head_dim {self.head_dim}")
        if "linear_attention" in self.layer_types:
            _check(self.linear_num_value_heads % self.linear_num_key_heads == 0, "linear_num_value_heads",
                   f"{self.linear_num_value_heads} is not a multiple of "
                   f"linear_num_key_heads={self.linear_num_key_heads}")
        if self.num_experts > 0:
            _check(0 < self.num_experts_per_tok <= self.num_experts, "num_experts_per_tok",
                   self.num_experts_per_tok)
        _check(self.dtype in DTYPES, "dtype", self.dtype)

    # -- derived -------------------------------------------------------------------------
    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def is_moe_layer(self, layer: int) -> bool:
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_moe_layer(i))

    @property
    def attention_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "full_attention")

    @property
    def deltanet_layers(self) -> tuple[int, ...]:
        return tuple(i for i, t in enumerate(self.layer_types) if t == "linear_attention")

    @property
    def linear_conv_dim(self) -> int:
        return (2 * self.linear_num_key_heads * self.linear_key_head_dim
                + self.linear_num_value_heads * self.linear_value_head_dim)

    # -- loading -------------------------------------------------------------------------
    @classmethod
    def from_dir(cls, path: str | Path, dtype: str | None = None) -> ModelConfig:
        path = Path(path)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"{path}: no config.json (is this a Hugging Face checkpoint directory?)")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{cfg_file}: not valid JSON ({e})") from e
        return cls.from_hf(raw, dtype=dtype)

    @classmethod
    def from_hf(cls, raw: dict[str, Any], dtype: str | None = None) -> ModelConfig:
        archs = raw.get("architectures") or []
        model_type = raw.get("model_type")
        arch = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
        if arch is None and model_type in ARCHITECTURES.values():
            arch = model_type
        if arch is None:
            raise ConfigError(
                f"unknown architecture: architectures={archs!r}, model_type={model_type!r}; "
                f"supported: {sorted(ARCHITECTURES)}")

        def req(key: str) -> Any:
            if key not in raw or raw[key] is None:
                raise ConfigError(f"config.json: missing required field {key!r} for {arch}")
            return raw[key]

        hidden = int(req("hidden_size"))
        n_layers = int(req("num_hidden_layers"))
        n_heads = int(req("num_attention_heads"))
        is_next = arch == "qwen3_next"
        # Defaults for absent keys are those of the transformers config classes.
        head_dim = int(raw.get("head_dim") or (256 if is_next else hidden // n_heads))
        quantization = quant_config_from_hf(raw.get("quantization_config"))
        if raw.get("use_sliding_window"):
            raise ConfigError("config.json: use_sliding_window=true is not supported (sliding-window "
                              "attention is not implemented)")

        layer_types = raw.get("layer_types")
        if layer_types is None:
            if is_next:
                interval = int(raw.get("full_attention_interval", 4))
                _check(interval > 0, "full_attention_interval", interval)
                layer_types = ["full_attention" if (i + 1) % interval == 0 else "linear_attention"
                               for i in range(n_layers)]
            else:
                layer_types = ["full_attention"] * n_layers

        num_experts = raw.get("num_experts", raw.get("num_local_experts"))
        if num_experts is None:
            raise ConfigError("config.json: missing required field 'num_experts' (or 'num_local_experts')")

        eos = raw.get("eos_token_id")
        eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        eos_ids = tuple(int(e) for e in eos_list)
        dtype = dtype or raw.get("dtype") or raw.get("torch_dtype") or "bfloat16"
        if dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not supported (expected one of {sorted(DTYPES)})")

        return cls(
            arch=arch,
            vocab_size=int(req("vocab_size")),
            hidden_size=hidden,
            num_hidden_layers=n_layers,
            layer_types=tuple(layer_types),
            num_attention_heads=n_heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or (2 if is_next else 4)),
            head_dim=head_dim,
            rope=_rope_from_hf(raw, head_dim, default_partial=0.25 if is_next else 1.0),
            max_position_embeddings=int(req("max_position_embeddings")),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            zero_centered_norm=is_next,
            attn_output_gate=is_next,
            attention_bias=bool(raw.get("attention_bias", False)),
            linear_conv_kernel_dim=int(raw.get("linear_conv_kernel_dim", 4)),
            linear_key_head_dim=int(raw.get("linear_key_head_dim", 128)),
            linear_value_head_dim=int(raw.get("linear_value_head_dim", 128)),
            linear_num_key_heads=int(raw.get("linear_num_key_heads", 16)),
            linear_num_value_heads=int(raw.get("linear_num_value_heads", 32)),
            num_experts=int(num_experts),
            num_experts_per_tok=int(req("num_experts_per_tok")),
            norm_topk_prob=bool(raw.get("norm_topk_prob", is_next)),
            moe_intermediate_size=int(req("moe_intermediate_size")),
            shared_expert_intermediate_size=int(raw.get("shared_expert_intermediate_size") or 0),
            intermediate_size=int(raw.get("intermediate_size") or 0),
            decoder_sparse_step=int(raw.get("decoder_sparse_step") or 1),
            mlp_only_layers=tuple(raw.get("mlp_only_layers") or ()),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype=dtype,
            bos_token_id=None if raw.get("bos_token_id") is None else int(raw["bos_token_id"]),
            eos_token_ids=eos_ids,
            num_mtp_layers=int(raw.get("num_nextn_predict_layers", 1 if is_next else 0)),
            quantization=quantization,
            extra=raw,
        )


def quant_config_from_hf(quant: Any) -> QuantConfig | None:
    """config.json's `quantization_config` (None or empty: unquantized). Only block-wise FP8 is
    read; anything else is refused naming the key, since its scales would otherwise be dropped."""
    if not quant:
        return None
    if not isinstance(quant, dict):
        raise ConfigError(f"config.json: quantization_config must be an object, got {quant!r}")
    method = quant.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config.json: quantization_config.quant_method={method!r} is not supported "
                          f"(supported: 'fp8' with a weight_block_size, as in Qwen's -FP8 checkpoints)")
    block = quant.get("weight_block_size")
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"config.json: quantization_config.weight_block_size={block!r} is not supported "
                          f"(expected two positive integers, e.g. [128, 128]; per-tensor FP8 is not read)")
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme != "dynamic":
        raise ConfigError(f"config.json: quantization_config.activation_scheme={scheme!r} is not supported "
                          f"(block-wise FP8 scales activations per token group at run time: 'dynamic')")
    fmt = quant.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"config.json: quantization_config.fmt={fmt!r} is not supported (expected 'e4m3')")
    skip = quant.get("modules_to_not_convert")
    if skip is None:
        skip = quant.get("ignored_layers") or []  # vLLM's / llm-compressor's name for the same list
    if not isinstance(skip, list) or not all(isinstance(m, str) for m in skip):
        raise ConfigError(f"config.json: quantization_config.modules_to_not_convert={skip!r} "
                          f"(expected a list of module names)")
    return QuantConfig(method="fp8", block=(int(block[0]), int(block[1])),
                       modules_to_not_convert=tuple(skip), activation_scheme=scheme)


def _rope_from_hf(raw: dict[str, Any], head_dim: int, default_partial: float) -> RopeConfig:
    """Folds the hub layout (top-level rope_theta, partial_rotary_factor, rope_scaling) and the
    transformers-5 layout (rope_parameters) into one RopeConfig; rope_scaling wins, as in HF."""
    params: dict[str, Any] = {}
    params.update(raw.get("rope_parameters") or {})
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in raw and raw[key] is not None and key not in params:
            params[key] = raw[key]
    params.update(raw.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    rope_type = params.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ConfigError(f"rope_scaling.rope_type {rope_type!r} is not supported "
                          f"(expected one of {ROPE_TYPES})")
    theta = float(params.get("rope_theta", 10000.0))
    partial = float(params.get("partial_rotary_factor", default_partial))
    rope = RopeConfig(
        theta=theta,
        rotary_dim=int(head_dim * partial),
        rope_type=rope_type,
        factor=float(params.get("factor", 1.0)),
        original_max_position_embeddings=params.get("original_max_position_embeddings"),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )
    if rope_type == "yarn" and rope.original_max_position_embeddings is None:
        raise ConfigError("rope_scaling: yarn needs 'original_max_position_embeddings'")
    return rope


def _check(ok: bool, key: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"config.json: invalid {key}: {value}")
