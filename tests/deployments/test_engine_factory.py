"""build_engine hands ray_config.yaml's KV-cache settings (engine.block_size, engine.num_kv_blocks)
to the executor, and a server's context length is what that cache can hold."""

from __future__ import annotations

import pytest

from deployments.config import NextserveConfig
from deployments.engine_factory import build_engine
from engine.config import NextserveConfigError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("factory"), arch="qwen3_moe")


def test_block_settings_reach_the_executor_and_bound_the_context(tiny_dir):
    config = NextserveConfig.from_args({"model": str(tiny_dir), "executor": "local", "engine": {
        "max_num_seqs": 2, "max_model_len": 64, "block_size": 4, "num_kv_blocks": 10}})
    engine, _, max_len = build_engine(config)
    try:
        ex = engine.engine.executor
        assert (ex.block_size, ex.num_kv_blocks) == (4, 10)
        assert max_len == 40  # 10 blocks of 4 tokens: less than max_model_len
        assert engine.stats().num_kv_blocks == 10
    finally:
        engine.shutdown()
    default = NextserveConfig.from_args({"engine": {"max_num_seqs": 2, "max_model_len": 64}})
    assert (default.engine.block_size, default.engine.num_kv_blocks) == (16, None)


@pytest.mark.parametrize("key", ["block_size", "num_kv_blocks"])
def test_bad_block_settings_name_the_key(key):
    with pytest.raises(NextserveConfigError, match=rf"engine\.{key}: .*greater than or equal to 1 \(got 0\)"):
        NextserveConfig.from_args({"engine": {key: 0}})
