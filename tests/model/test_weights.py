import json
import re

import pytest
import torch
from safetensors.torch import save_file

from model.weights import INDEX_FILE, CheckpointError, CheckpointReader

TENSORS = {
    "model.embed_tokens.weight": torch.arange(12.0).reshape(3, 4),
    "model.layers.0.mlp.experts.0.up_proj.weight": torch.full((2, 4), 0.5),
    "model.layers.1.mlp.experts.0.up_proj.weight": torch.full((2, 4), 1.5),
    "mtp.fc.weight": torch.ones(4, 8),
}
SHARDS = {
    "model-00001-of-00002.safetensors": ["model.embed_tokens.weight",
                                         "model.layers.0.mlp.experts.0.up_proj.weight"],
    "model-00002-of-00002.safetensors": ["model.layers.1.mlp.experts.0.up_proj.weight", "mtp.fc.weight"],
}


@pytest.fixture
def single(tmp_path):
    save_file(TENSORS, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.fixture
def sharded(tmp_path):
    for file, names in SHARDS.items():
        save_file({n: TENSORS[n] for n in names}, str(tmp_path / file))
    weight_map = {n: file for file, names in SHARDS.items() for n in names}
    (tmp_path / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return tmp_path


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_reads_each_tensor_by_its_checkpoint_name(layout, request):
    reader = CheckpointReader(request.getfixturevalue(layout))
    assert reader.names() == set(TENSORS)
    assert reader.has("mtp.fc.weight") and not reader.has("lm_head.weight")
    for name, expected in TENSORS.items():
        torch.testing.assert_close(reader.get(name, shape=tuple(expected.shape)), expected, rtol=0, atol=0)
    got = reader.get("model.embed_tokens.weight", dtype=torch.bfloat16)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 4)


def test_records_what_was_read_and_opens_only_needed_shards(sharded):
    reader = CheckpointReader(sharded)
    assert reader.accessed == [] and reader.files_opened == set()  # the index alone is enough
    reader.get("model.layers.1.mlp.experts.0.up_proj.weight")
    reader.get("mtp.fc.weight")
    assert reader.accessed == ["model.layers.1.mlp.experts.0.up_proj.weight", "mtp.fc.weight"]
    assert reader.files_opened == {"model-00002-of-00002.safetensors"}
    assert reader.file_of("mtp.fc.weight") == "model-00002-of-00002.safetensors"


def test_missing_shard_fails_only_for_its_own_tensors(sharded):
    (sharded / "model-00001-of-00002.safetensors").unlink()
    reader = CheckpointReader(sharded)  # a partial copy is fine until a missing tensor is needed
    assert reader.get("mtp.fc.weight").shape == (4, 8)
    with pytest.raises(CheckpointError, match=r"'model\.embed_tokens\.weight'.*model-00001-of-00002"):
        reader.get("model.embed_tokens.weight")
    assert reader.accessed == ["mtp.fc.weight"]


def test_wrong_shape_names_tensor_file_and_both_shapes(single):
    reader = CheckpointReader(single)
    with pytest.raises(CheckpointError) as e:
        reader.get("model.embed_tokens.weight", shape=(4, 3))
    msg = str(e.value)
    assert "'model.embed_tokens.weight'" in msg and "model.safetensors" in msg
    assert "(3, 4)" in msg and "(4, 3)" in msg
    assert reader.accessed == []


@pytest.mark.parametrize("layout", ["single", "sharded"])
def test_missing_tensor_names_it_and_the_checkpoint(layout, request):
    path = request.getfixturevalue(layout)
    with pytest.raises(CheckpointError, match=rf"'lm_head\.weight'.*{re.escape(str(path))}"):
        CheckpointReader(path).get("lm_head.weight")


def test_tensor_absent_from_the_shard_the_index_names(sharded):
    index = json.loads((sharded / INDEX_FILE).read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    (sharded / INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"'lm_head\.weight'.*model-00001-of-00002"):
        CheckpointReader(sharded).get("lm_head.weight")


def test_missing_directory_and_no_weights(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope.*does not exist"):
        CheckpointReader(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"no \*\.safetensors"):
        CheckpointReader(tmp_path)


@pytest.mark.parametrize("text, match", [
    ("{not json", "not valid JSON"),
    ('{"metadata": {}}', "weight_map"),
    ('{"weight_map": ["a"]}', "weight_map"),
    ('{"weight_map": {"a.weight": "../elsewhere.safetensors"}}', r"'a\.weight'.*elsewhere"),
])
def test_bad_index(tmp_path, text, match):
    (tmp_path / INDEX_FILE).write_text(text)
    with pytest.raises(CheckpointError, match=match) as e:
        CheckpointReader(tmp_path)
    assert INDEX_FILE in str(e.value)


def test_unreadable_or_ambiguous_files_without_index(single):
    save_file({"model.embed_tokens.weight": torch.zeros(3, 4)}, str(single / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"'model\.embed_tokens\.weight'.*extra\.safetensors.*model"):
        CheckpointReader(single)
    (single / "extra.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00garbage!")
    with pytest.raises(CheckpointError, match=r"extra\.safetensors.*not a readable"):
        CheckpointReader(single)
