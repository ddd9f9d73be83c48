"""Config and checkpoint errors stop a replica at start-up with a message that names the file, the
key and the value, not a traceback from deep in torch."""

from __future__ import annotations

import json
import shutil

import pytest

from deployments.config import NextserveConfig
from deployments.engine_factory import build_engine


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("startup"), arch="qwen3_next")


def broken(tiny_dir, tmp_path, edit) -> str:
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_dir, d)
    edit(d)
    return str(d)


def set_config(**fields):
    def edit(d):
        c = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**c, **fields}))
    return edit


def corrupt_weights(d):
    for f in d.glob("*.safetensors"):
        f.write_bytes(b"not a safetensors file")


def drop_weights(d):
    for f in d.glob("*.safetensors"):
        f.unlink()


@pytest.mark.parametrize("edit,message", [
    (None, "is not a directory"),
    (lambda d: (d / "config.json").write_text("{oops"), "config.json: not valid JSON"),
    (set_config(hidden_size=-3), "invalid hidden_size: -3"),
    (set_config(vocab_size=0), "invalid vocab_size: 0"),
    (set_config(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "GPT2LMHeadModel"),
    (drop_weights, "no *.safetensors files"),
    (corrupt_weights, "not a readable safetensors file"),
    (lambda d: (d / "tokenizer.json").unlink(), "has no tokenizer.json"),
    (set_config(quantization_config={"quant_method": "awq", "bits": 4}),
     "quantization_config.quant_method='awq' is not supported"),
    (set_config(quantization_config={"quant_method": "fp8"}), "quantization_config.weight_block_size=None"),
])
def test_bad_checkpoint_is_clear_at_start(tiny_dir, tmp_path, edit, message):
    model = str(tmp_path / "missing") if edit is None else broken(tiny_dir, tmp_path, edit)
    with pytest.raises(ValueError) as e:
        build_engine(NextserveConfig.from_args({"model": model, "executor": "local"}))
    assert message in str(e.value)


def test_a_prompt_limit_no_replica_can_admit_stops_start_up():
    from deployments.app import build_app
    from engine.config import NextserveConfigError

    args = {"engine": {"max_num_seqs": 4}, "serve": {"max_queued_requests": 8, "max_prompts_per_request": 13}}
    with pytest.raises(NextserveConfigError, match=r"serve.max_prompts_per_request: 13 .* = 12"):
        build_app(args)


def test_a_quantized_checkpoint_stops_nextserve_serve_before_ray_starts(tiny_dir, tmp_path, capsys):
    from deployments.cli import main

    model = broken(tiny_dir, tmp_path, set_config(quantization_config={"quant_method": "awq"}))
    with pytest.raises(ValueError, match=r"quantization_config\.quant_method='awq'"):
        from deployments.app import build_app

        build_app({"model": model})
    assert main(["serve", "--model", model]) == 2
    err = capsys.readouterr().err
    assert "quantization_config.quant_method='awq' is not supported" in err and err.count("\n") == 1, err


@pytest.mark.parametrize("edit", [
    lambda d: (d / "config.json").write_text("{oops"),
    set_config(hidden_size=-3),
    corrupt_weights,
])
def test_an_engine_core_process_fails_start_up_with_the_same_error(tiny_dir, tmp_path, edit):
    """engine.engine_process=separate: the checkpoint is read in the core process; the replica
    gets the same exception, with the same text, as when it reads the checkpoint itself."""
    model = broken(tiny_dir, tmp_path, edit)
    errors = []
    for process in ("inline", "separate"):
        with pytest.raises(ValueError) as e:
            build_engine(NextserveConfig.from_args({"model": model, "executor": "local",
                                                    "engine": {"engine_process": process}}))
        errors.append((type(e.value), str(e.value)))
    assert errors[0] == errors[1]
