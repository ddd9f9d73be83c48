import json
import re

import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer

from model.config import ModelConfig
from model.tiny import SPECIAL_TOKENS, TAG_TOKENS, make_tiny_model
from model.weights import INDEX_FILE, CheckpointReader

ARCHS = ["qwen3_next", "qwen3_moe"]
TEXT = "Hello world! The answer is 42.\nWhat about ünïcode 🙂 and\ttabs?"


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request, tmp_path_factory):
    return request.param, make_tiny_model(tmp_path_factory.mktemp(request.param), arch=request.param)


def test_same_arguments_give_identical_files(tmp_path):
    a = make_tiny_model(tmp_path / "a", arch="qwen3_next", seed=3, dtype="bfloat16")
    b = make_tiny_model(tmp_path / "b", arch="qwen3_next", seed=3, dtype="bfloat16")
    files = sorted(f.name for f in a.iterdir())
    assert files == sorted(f.name for f in b.iterdir())
    assert "model.safetensors" in files and "tokenizer.json" in files
    for name in files:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    c = make_tiny_model(tmp_path / "c", arch="qwen3_next", seed=4, dtype="bfloat16")
    assert (c / "model.safetensors").read_bytes() != (a / "model.safetensors").read_bytes()


def test_hub_layout_config_that_model_config_accepts(tiny):
    arch, path = tiny
    raw = json.loads((path / "config.json").read_text())
    assert "layer_types" not in raw and "rope_parameters" not in raw and raw["torch_dtype"] == "float32"
    config = ModelConfig.from_dir(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert config.arch == arch and config.vocab_size % 64 == 0 and config.vocab_size >= tok.get_vocab_size()
    assert config.eos_token_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))
    assert config.bos_token_id == tok.token_to_id("<|endoftext|>")
    if arch == "qwen3_next":
        assert config.layer_types == ("linear_attention",) * 3 + ("full_attention",)
        assert config.rope.rotary_dim == 8 and config.rope.theta == 1e7
        assert config.num_experts == 16 and config.shared_expert_intermediate_size == 32
    else:
        assert config.layer_types == ("full_attention",) * 4 and config.rope.rotary_dim == 16
        assert config.num_experts == 8 and not config.norm_topk_prob
    assert config.moe_layers == (0, 1, 2, 3)


def test_loads_in_transformers_without_missing_or_unexpected_keys(tiny):
    from transformers import AutoModelForCausalLM

    arch, path = tiny
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    assert not any(info.values()), info
    names = CheckpointReader(path).names()
    assert any(n.startswith("mtp.") for n in names) == (arch == "qwen3_next")  # HF ignores mtp.*
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.5  # not flat


def test_checkpoint_names_and_shapes_match_the_spec(tiny):
    arch, path = tiny
    reader = CheckpointReader(path)
    names = reader.names()
    if arch == "qwen3_next":
        assert reader.get("model.layers.0.linear_attn.in_proj_qkvz.weight").shape == (192, 64)
        assert reader.get("model.layers.0.linear_attn.conv1d.weight").shape == (128, 1, 4)
        assert reader.get("model.layers.3.self_attn.q_proj.weight").shape == (256, 64)  # + output gate
        assert reader.get("model.layers.1.mlp.shared_expert_gate.weight").shape == (1, 64)
        assert reader.get("mtp.fc.weight").shape == (64, 128)
        assert "mtp.layers.0.mlp.experts.15.down_proj.weight" in names
        assert torch.all(reader.get("model.layers.0.linear_attn.A_log").exp().clamp(1, 16) ==
                         reader.get("model.layers.0.linear_attn.A_log").exp())
        assert reader.get("model.norm.weight").mean().abs() < 0.1  # zero-centred
    else:
        assert reader.get("model.layers.0.self_attn.q_proj.weight").shape == (64, 64)
        assert not any("shared_expert" in n or "linear_attn" in n for n in names)
        assert (reader.get("model.norm.weight").mean() - 1).abs() < 0.1
    assert f"model.layers.3.mlp.experts.{7 if arch == 'qwen3_moe' else 15}.up_proj.weight" in names


def test_tokenizer_round_trips_and_matches_transformers(tiny):
    from transformers import AutoTokenizer

    _, path = tiny
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    assert 400 <= tok.get_vocab_size() <= 512
    ids = tok.encode(TEXT).ids
    assert tok.decode(ids) == TEXT
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [480, 481, 482]
    assert tok.encode("<|im_start|>user\nhi<|im_end|>").ids[0] == 481

    hf = AutoTokenizer.from_pretrained(path)
    assert hf(TEXT)["input_ids"] == ids
    assert hf.eos_token == "<|im_end|>" and hf.pad_token_id == 480 and hf.bos_token is None
    chat = hf.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                  tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    generation = json.loads((path / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [482, 480]

    # Qwen3's tags are single tokens that decoding keeps, as in Qwen3's vocabulary
    text = "<think>\nhm\n</think>\n\n<tool_call>\n{}\n</tool_call>"
    ids = tok.encode(text).ids
    assert [tok.token_to_id(t) for t in TAG_TOKENS] == list(range(483, 483 + len(TAG_TOKENS)))
    assert all(tok.token_to_id(t) in ids for t in TAG_TOKENS[:4])
    assert hf(text)["input_ids"] == ids and hf.decode(ids, skip_special_tokens=True) == text
    assert tok.decode(ids, skip_special_tokens=True) == text


def test_sharded_checkpoint_has_a_valid_index_and_same_values(tmp_path):
    single = make_tiny_model(tmp_path / "single", arch="qwen3_next")
    path = make_tiny_model(tmp_path / "sharded", arch="qwen3_next", max_shard_bytes=200_000)
    index = json.loads((path / INDEX_FILE).read_text())
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) > 4 and not (path / "model.safetensors").exists()
    assert files == sorted(f.name for f in path.glob("*.safetensors"))
    assert all(re.fullmatch(rf"model-\d{{5}}-of-{len(files):05d}\.safetensors", f) for f in files)
    total = 0
    for file in files:
        with safe_open(str(path / file), framework="pt") as f:
            names = list(f.keys())
            assert set(names) == {n for n, v in weight_map.items() if v == file}
            total += sum(f.get_tensor(n).numel() * 4 for n in names)  # float32
        layers = {m.group(1) for n in names if (m := re.match(r"(model\.layers\.\d+)\.mlp\.experts", n))}
        assert len(layers) <= 1, f"{file} mixes experts of {layers}"
    assert index["metadata"]["total_size"] == total

    a, b = CheckpointReader(single), CheckpointReader(path)
    assert a.names() == b.names() == set(weight_map)
    for name in sorted(a.names())[::7]:
        assert torch.equal(a.get(name), b.get(name)), name

    make_tiny_model(path, arch="qwen3_next")  # rewriting leaves no stale shards behind
    assert not (path / INDEX_FILE).exists() and [f.name for f in path.glob("*.safetensors")] == [
        "model.safetensors"]


def test_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="arch"):
        make_tiny_model(tmp_path, arch="llama")
    with pytest.raises(ValueError, match="dtype"):
        make_tiny_model(tmp_path, dtype="int8")


def test_overrides_resize_the_model_and_are_checked(tmp_path):
    plain = make_tiny_model(tmp_path / "plain", arch="qwen3_next")
    same = make_tiny_model(tmp_path / "same", arch="qwen3_next", overrides={})
    assert (plain / "model.safetensors").read_bytes() == (same / "model.safetensors").read_bytes()
    wide = make_tiny_model(tmp_path / "wide", arch="qwen3_next", overrides=dict(
        hidden_size=96, num_experts=6, num_experts_per_tok=3, moe_intermediate_size=24,
        num_hidden_layers=2, full_attention_interval=2))
    config = ModelConfig.from_dir(wide)
    assert (config.hidden_size, config.num_experts, config.num_experts_per_tok) == (96, 6, 3)
    assert config.layer_types == ("linear_attention", "full_attention")
    reader = CheckpointReader(wide)
    assert reader.get("model.layers.1.mlp.experts.5.gate_proj.weight").shape == (24, 96)
    assert "model.layers.2.input_layernorm.weight" not in reader.names()
    with pytest.raises(ValueError, match="shared_expert_intermediate_size"):  # Qwen3 MoE has none
        make_tiny_model(tmp_path / "moe", arch="qwen3_moe", overrides={"shared_expert_intermediate_size": 8})
    with pytest.raises(ValueError, match="model_type"):
        make_tiny_model(tmp_path / "moe", arch="qwen3_moe", overrides={"model_type": "qwen3_next"})
