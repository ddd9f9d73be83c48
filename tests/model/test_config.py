"""ModelConfig from both config.json layouts, the real models' files, and clear errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from model.config import ConfigError, ModelConfig
from model.rope import rope_frequencies

# The hub's Qwen3-Next-80B-A3B-Instruct config.json (hub layout: no layer_types, top-level rope).
NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", "vocab_size": 151936,
    "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 16, "num_key_value_heads": 2,
    "head_dim": 256, "partial_rotary_factor": 0.25, "rope_theta": 10000000, "rope_scaling": None,
    "max_position_embeddings": 262144, "rms_norm_eps": 1e-6, "hidden_act": "silu",
    "full_attention_interval": 4, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_value_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 32,
    "num_experts": 512, "num_experts_per_tok": 10, "norm_topk_prob": True, "moe_intermediate_size": 512,
    "shared_expert_intermediate_size": 512, "intermediate_size": 5120, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "tie_word_embeddings": False, "bos_token_id": 151643, "eos_token_id": 151645,
    "torch_dtype": "bfloat16",
}
QWEN3_30B = {
    "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": 151936,
    "hidden_size": 2048, "num_hidden_layers": 48, "num_attention_heads": 32, "num_key_value_heads": 4,
    "head_dim": 128, "rope_theta": 1000000.0, "rope_scaling": None, "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-6, "num_experts": 128, "num_experts_per_tok": 8, "norm_topk_prob": True,
    "moe_intermediate_size": 768, "intermediate_size": 6144, "decoder_sparse_step": 1,
    "mlp_only_layers": [], "tie_word_embeddings": False, "eos_token_id": 151645, "torch_dtype": "bfloat16",
}


def test_qwen3_next_hub_layout():
    c = ModelConfig.from_hf(NEXT_80B)
    assert c.arch == "qwen3_next" and c.zero_centered_norm and c.attn_output_gate
    assert c.attention_layers == tuple(range(3, 48, 4)) and len(c.deltanet_layers) == 36
    assert c.rope.theta == 1e7 and c.rope.rotary_dim == 64 and c.rope.rope_type == "default"
    assert c.linear_conv_dim == 8192 and len(c.moe_layers) == 48 and c.dtype == "bfloat16"


def test_qwen3_moe_hub_layout():
    c = ModelConfig.from_hf(QWEN3_30B)
    assert c.arch == "qwen3_moe" and not c.zero_centered_norm and not c.attn_output_gate
    assert c.layer_types == ("full_attention",) * 48 and c.rope.rotary_dim == 128
    assert c.shared_expert_intermediate_size == 0 and c.num_experts == 128


def test_transformers5_layout_round_trip(tmp_path):
    from transformers import Qwen3NextConfig

    Qwen3NextConfig(num_hidden_layers=8, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e7, "partial_rotary_factor": 0.25, "factor": 4.0,
        "original_max_position_embeddings": 262144}).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "layer_types" in raw and "rope_parameters" in raw and "rope_theta" not in raw
    c = ModelConfig.from_dir(tmp_path)
    assert c.layer_types == tuple(raw["layer_types"]) and c.rope.rope_type == "yarn"
    assert c.rope.rotary_dim == 64 and c.rope.factor == 4.0


@pytest.mark.parametrize("partial", [0.25, 1.0])
def test_yarn_frequencies_match_transformers(partial):
    from transformers import Qwen3NextConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = Qwen3NextConfig(rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e7, "partial_rotary_factor": partial, "factor": 4.0,
        "original_max_position_embeddings": 262144})
    inv_hf, scale_hf = ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")
    raw = {**NEXT_80B, "partial_rotary_factor": partial,
           "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 262144}}
    inv, scale = rope_frequencies(ModelConfig.from_hf(raw).rope)
    torch.testing.assert_close(inv, inv_hf)
    assert scale == pytest.approx(scale_hf) == pytest.approx(0.1 * math.log(4.0) + 1)


@pytest.mark.parametrize("change, message", [
    ({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}, "unknown architecture"),
    ({"hidden_size": None}, "'hidden_size'"),
    ({"num_experts": None}, "'num_experts'"),
    ({"rope_scaling": {"rope_type": "longrope"}}, "rope_type 'longrope'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "original_max_position_embeddings"),
    ({"num_key_value_heads": 3}, "num_key_value_heads"),
    ({"layer_types": ["full_attention"] * 47}, "layer_types"),
    ({"layer_types": ["sliding_attention"] * 48}, "'sliding_attention'"),
    ({"num_experts_per_tok": 600}, "num_experts_per_tok"),
    ({"torch_dtype": "int8"}, "dtype 'int8'"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    # read as plain weights, an AWQ checkpoint's scales would be dropped (FP8: tests/model/test_fp8.py)
    ({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128}},
     "quantization_config.quant_method='awq' is not supported"),
    ({"quantization_config": {"bits": 4}}, "quantization_config.quant_method=None"),
])
def test_bad_config_names_the_field(change, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        ModelConfig.from_hf({**NEXT_80B, **change})


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"no config\.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ModelConfig.from_dir(tmp_path)
