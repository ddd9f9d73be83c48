"""Block-wise FP8 checkpoints: a tiny checkpoint quantized the way Qwen's -FP8 releases are laid
out loads (dequantized at load, or kept FP8 and dequantized on the fly) to the same logits and
greedy tokens as its dequantized float copy, which this test writes with its own tile loop; edge
tiles where a dimension is not a multiple of the tile; errors name the key or tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.batch import BatchLayout
from model.config import ConfigError, ModelConfig
from model.decoder import CausalLM
from model.fp8 import FP8_DTYPE, Fp8Experts, Fp8Linear, dequantize_blockwise, quantize_blockwise
from model.fp8_checkpoint import write_fp8_copy
from model.tiny import make_tiny_model
from model.weights import CheckpointError, CheckpointReader

PROMPTS = [[5, 9, 13, 2, 77, 31, 8], [101, 7, 250]]
# [16, 16] divides every tiny dimension; [24, 40] leaves edge tiles in each (64 = 2·24 + 16 = 40 + 24).
BLOCKS = [(16, 16), (24, 40)]


def naive_dequantize(w: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """Tile by tile, as the format defines it: out[tile] = float(w[tile]) · scale_inv[tile]."""
    out = torch.empty(w.shape, dtype=torch.float32)
    bn, bk = block
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * bn, (i + 1) * bn), slice(j * bk, (j + 1) * bk)
            out[rows, cols] = w[rows, cols].float() * s[i, j]
    return out


def dequantized_copy(fp8_dir, dst):
    """The FP8 checkpoint as plain float32 weights (no quantization_config)."""
    quant = json.loads((fp8_dir / "config.json").read_text())["quantization_config"]
    block = tuple(quant["weight_block_size"])
    tensors = load_file(str(fp8_dir / "model.safetensors"))
    plain = {name: naive_dequantize(t, tensors[name + "_scale_inv"], block) if t.dtype == FP8_DTYPE else t
             for name, t in tensors.items() if not name.endswith("_scale_inv")}
    shutil.copytree(fp8_dir, dst)
    save_file(plain, str(dst / "model.safetensors"))
    raw = json.loads((dst / "config.json").read_text())
    del raw["quantization_config"]
    (dst / "config.json").write_text(json.dumps(raw))
    return dst


@pytest.fixture(scope="module", params=BLOCKS, ids=lambda b: f"block{b[0]}x{b[1]}")
def checkpoints(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    tiny = make_tiny_model(root / "tiny")
    fp8 = write_fp8_copy(tiny, root / "fp8", block=request.param)
    return fp8, dequantized_copy(fp8, root / "plain"), request.param


def greedy(model: CausalLM, steps: int = 6) -> tuple[torch.Tensor, list[list[int]]]:
    """The prompts' last-token logits, then `steps` greedy tokens per prompt."""
    caches = model.make_caches(len(PROMPTS), 64)
    seqs = [list(p) for p in PROMPTS]
    slots = list(range(len(seqs)))
    layout = BatchLayout.build(slots, [0] * len(seqs), [len(s) for s in seqs])
    hidden = model(torch.tensor([t for s in seqs for t in s]), layout, caches)
    first = model.compute_logits(hidden[layout.last_token_index()])
    logits = first
    for _ in range(steps):
        for s, t in zip(seqs, logits.argmax(-1).tolist(), strict=True):
            s.append(t)
        layout = BatchLayout.build(slots, [len(s) - 1 for s in seqs], [1] * len(seqs))
        logits = model.compute_logits(model(torch.tensor([s[-1] for s in seqs]), layout, caches))
    return first, [s[len(p):] for s, p in zip(seqs, PROMPTS, strict=True)]


def test_the_copy_is_laid_out_like_a_real_fp8_checkpoint(checkpoints):
    fp8, _, block = checkpoints
    config = ModelConfig.from_dir(fp8)
    assert config.quantization is not None and config.quantization.block == block
    tensors = load_file(str(fp8 / "model.safetensors"))
    q = tensors["model.layers.0.linear_attn.in_proj_qkvz.weight"]
    s = tensors["model.layers.0.linear_attn.in_proj_qkvz.weight_scale_inv"]
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32
    assert s.shape == (-(-q.shape[0] // block[0]), -(-q.shape[1] // block[1]))
    assert tensors["model.layers.0.mlp.experts.3.down_proj.weight"].dtype == FP8_DTYPE
    layer0 = ("mlp.gate", "mlp.shared_expert_gate", "linear_attn.in_proj_ba", "input_layernorm",
              "linear_attn.conv1d")
    kept_names = [f"model.layers.0.{m}.weight" for m in layer0]
    for kept in ("model.embed_tokens.weight", "lm_head.weight", *kept_names):
        assert tensors[kept].dtype == torch.float32 and kept + "_scale_inv" not in tensors, kept


def test_dequantized_at_load_equals_the_dequantized_copy(checkpoints):
    fp8, plain, _ = checkpoints
    got, want = CausalLM.from_pretrained(fp8, fp8="dequantize"), CausalLM.from_pretrained(plain)
    assert not any(isinstance(m, (Fp8Linear, Fp8Experts)) for m in got.modules())
    for (name, a), (_, b) in zip(got.state_dict().items(), want.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    logits, tokens = greedy(got)
    want_logits, want_tokens = greedy(want)
    assert torch.equal(logits, want_logits) and tokens == want_tokens


def test_kept_fp8_dequantized_on_the_fly_matches_the_dequantized_copy(checkpoints):
    fp8, plain, _ = checkpoints
    kept = CausalLM.from_pretrained(fp8, fp8="keep")
    fp8_modules = [m for m in kept.modules() if isinstance(m, (Fp8Linear, Fp8Experts))]
    assert any(isinstance(m, Fp8Experts) for m in fp8_modules) and len(fp8_modules) > 10
    # resolved at load: a CPU has no block-scaled GEMM, so each Linear dequantizes per call
    assert {m.kernel for m in fp8_modules if isinstance(m, Fp8Linear)} == {"dequantize"}
    assert isinstance(kept.model.layers[0].mlp.gate, torch.nn.Module)  # the router stays float
    assert kept.model.layers[0].mlp.gate.weight.dtype == torch.float32
    assert kept.model.layers[0].mlp.experts.gate_up.dtype == FP8_DTYPE  # half bf16's bytes
    logits, tokens = greedy(kept)
    want_logits, want_tokens = greedy(CausalLM.from_pretrained(plain))
    torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-5 * want_logits.abs().max().item())
    assert tokens == want_tokens


@pytest.mark.parametrize("shape", [(64, 64), (70, 45), (3, 5, 33)])
def test_quantize_dequantize_round_trip_per_tile(shape):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    q, s = quantize_blockwise(w, (16, 16))
    assert q.shape == w.shape and s.shape == (*shape[:-2], -(-shape[-2] // 16), -(-shape[-1] // 16))
    deq = dequantize_blockwise(q, s, (16, 16))
    # e4m3 keeps 3 mantissa bits: within 1/16 of each tile's largest magnitude
    assert (deq - w).abs().max() <= w.abs().max() / 16
    if len(shape) == 2:
        assert torch.equal(deq, naive_dequantize(q, s, (16, 16)))
    with pytest.raises(ValueError, match="weight_scale_inv of shape"):
        dequantize_blockwise(q, s[..., :1], (16, 16))


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "awq", "bits": 4}, "quantization_config.quant_method='awq' is not supported"),
    ({"bits": 4}, "quantization_config.quant_method=None"),
    ({"quant_method": "fp8"}, "quantization_config.weight_block_size=None"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size=[128]"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "activation_scheme": "static"},
     "activation_scheme='static'"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "fmt": "e5m2"}, "fmt='e5m2'"),
])
def test_unsupported_quantization_names_the_key(quant, message, tmp_path):
    tiny = make_tiny_model(tmp_path / "m")
    raw = json.loads((tiny / "config.json").read_text())
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        ModelConfig.from_hf({**raw, "quantization_config": quant})


def test_modules_to_not_convert_matches_like_transformers():
    config = ModelConfig.from_hf({**json.loads(json.dumps(_next_raw())), "quantization_config": {
        "quant_method": "fp8", "weight_block_size": [128, 128],
        "modules_to_not_convert": ["lm_head", "model.layers.1", "mlp.gate",
                                   "model.layers.*.shared_expert_gate"]}})
    q = config.quantization
    assert not q.converts("lm_head") and not q.converts("model.layers.1.self_attn.q_proj")
    assert q.converts("model.layers.11.self_attn.q_proj")  # "layers.1" is not a prefix of "layers.11"
    assert not q.converts("model.layers.3.mlp.gate") and q.converts("model.layers.3.mlp.gate_proj")
    assert not q.converts("model.layers.7.mlp.shared_expert_gate")
    assert q.converts("model.layers.7.mlp.shared_expert.up_proj")


def _next_raw():
    from tests.model.test_config import NEXT_80B

    return NEXT_80B


def test_bad_fp8_tensors_name_the_tensor(checkpoints, tmp_path):
    fp8, _, _ = checkpoints
    name = "model.layers.0.linear_attn.out_proj.weight"
    tensors = load_file(str(fp8 / "model.safetensors"))
    broken = tmp_path / "no_scale"
    shutil.copytree(fp8, broken)
    kept = {k: v for k, v in tensors.items() if k != name + "_scale_inv"}
    save_file(kept, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"'{name}_scale_inv' are not in the checkpoint"):
        CheckpointReader(broken).get(name)
    raw = json.loads((broken / "config.json").read_text())
    raw["quantization_config"]["modules_to_not_convert"].append("model.layers.0.linear_attn.out_proj")
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match=r"modules_to_not_convert lists 'model\.layers\.0\.linear_attn"):
        CheckpointReader(broken).get(name)
    del raw["quantization_config"]
    (broken / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError, match="has no quantization_config"):
        CheckpointReader(broken).get(name)


def test_activation_groups_for_the_block_scaled_gemm():
    """Per-token groups of 128 with decoding scales laid out outer-dim-major [M, K/128], the
    layout torch's block-scaled GEMM takes for its 1x128 operand."""
    from model.fp8 import quantize_activations

    x = torch.randn(5, 256, generator=torch.Generator().manual_seed(1))
    q, s = quantize_activations(x, 128)
    assert q.dtype == FP8_DTYPE and s.shape == (5, 2) and s.stride() == (1, 5)
    back = q.float().view(5, 2, 128) * s[..., None]
    assert (back.view(5, 256) - x).abs().max() <= x.abs().max() / 16


def test_nextserve_generate_serves_the_fp8_checkpoint(checkpoints, capsys):
    """Through the engine (`nextserve generate`, local executor): the FP8 checkpoint's greedy
    tokens and logprobs are its dequantized copy's."""
    from deployments.cli import main

    fp8, plain, _ = checkpoints
    replies = []
    for model in (fp8, plain):
        code = main(["generate", "--model", str(model), "--max-tokens", "6", "--temperature", "0", "--json",
                     "--prompt-token-ids", "5,9,13,2,77", "--prompt-token-ids", "101,7"])
        assert code == 0
        replies.append([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert replies[0] == replies[1] and len(replies[0]) == 2
