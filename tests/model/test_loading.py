"""Loading only what a caller asks for: one layer's slice of experts reads no other expert's
tensor (it even works with every other shard file deleted); a mixer-side layer reads no routed
expert; a bad checkpoint is an error naming the tensor."""

from __future__ import annotations

import json
import re

import pytest
import torch

from model.config import ModelConfig
from model.decoder import CausalLM, DecoderLayer
from model.loading import load_experts, load_module, materialize
from model.moe import Experts
from model.tiny import make_tiny_model
from model.weights import INDEX_FILE, CheckpointError, CheckpointReader

EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("sharded"), max_shard_bytes=60_000)


def test_one_layers_expert_slice_reads_only_those_experts(sharded, tmp_path):
    config = ModelConfig.from_dir(sharded)
    layer, mine = 1, [4, 5, 6, 7]
    full = CheckpointReader(sharded)
    # Copy only the shard files that hold this slice: the others are not even there to read.
    needed = {full.file_of(f"model.layers.{layer}.mlp.experts.{e}.{p}.weight")
              for e in mine for p in ("gate_proj", "up_proj", "down_proj")}
    all_files = set(json.loads((sharded / INDEX_FILE).read_text())["weight_map"].values())
    assert len(all_files - needed) > 0, "the checkpoint should have shards this slice does not need"
    (tmp_path / INDEX_FILE).write_text((sharded / INDEX_FILE).read_text())
    for f in needed:
        (tmp_path / f).write_bytes((sharded / f).read_bytes())

    reader = CheckpointReader(tmp_path)
    with torch.device("meta"):
        experts = Experts(config.hidden_size, config.moe_intermediate_size, mine, config.num_experts)
    materialize(experts, "cpu", torch.float32)
    load_experts(experts, reader, f"model.layers.{layer}.mlp.experts.")

    read = {(int(m[1]), int(m[2])) for m in map(EXPERT.match, reader.accessed) if m}
    assert read == {(layer, e) for e in mine}
    assert len(reader.accessed) == 3 * len(mine)
    assert reader.files_opened == needed
    whole = CausalLM.from_pretrained(sharded).model.layers[layer].mlp.experts
    torch.testing.assert_close(experts.gate_up, whole.gate_up[mine])
    torch.testing.assert_close(experts.down, whole.down[mine])


def test_mixer_side_layer_reads_no_routed_expert(sharded):
    config = ModelConfig.from_dir(sharded)
    reader = CheckpointReader(sharded)
    with torch.device("meta"):
        layer = DecoderLayer(config, 0, expert_ids=[])
    materialize(layer, "cpu", torch.float32)
    load_module(layer, reader, prefix="model.layers.0.")
    assert reader.accessed and not any(EXPERT.match(n) for n in reader.accessed)
    assert all(n.startswith("model.layers.0.") for n in reader.accessed)
    assert "model.layers.0.mlp.shared_expert.gate_proj.weight" in reader.accessed


def _edit_checkpoint(src, dst, edit):
    from safetensors.torch import load_file, save_file

    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    tensors = load_file(src / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors")
    return dst


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    src = make_tiny_model(tmp_path / "src")
    name = "model.layers.2.linear_attn.in_proj_ba.weight"
    (tmp_path / "missing").mkdir()
    missing = _edit_checkpoint(src, tmp_path / "missing", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=re.escape(repr(name))):
        CausalLM.from_pretrained(missing)

    (tmp_path / "bad_shape").mkdir()
    bad = _edit_checkpoint(src, tmp_path / "bad_shape", lambda t: t.update({name: t[name][:, :-1].clone()}))
    with pytest.raises(CheckpointError, match=re.escape(name) + r".*shape"):
        CausalLM.from_pretrained(bad)
