"""build_engine hands ray_config.yaml's KV-cache settings (engine.block_size, engine.num_kv_blocks)
to the executor, and a server's context length is what that cache can hold."""

from __future__ import annotations

import pytest

from deployments.config import NextserveConfig
from deployments.engine_factory import build_engine, build_llm_engine
from engine.config import NextserveConfigError


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("factory"), arch="qwen3_moe")


def test_block_settings_reach_the_executor_and_bound_the_context(tiny_dir):
    config = NextserveConfig.from_args({"model": str(tiny_dir), "executor": "local", "engine": {
        "max_num_seqs": 2, "max_model_len": 64, "block_size": 4, "num_kv_blocks": 10,
        "engine_process": "inline"}})
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


def test_prefix_cache_settings_reach_engine_and_executor(tmp_path):
    from deployments.engine_factory import build_llm_engine
    from model.tiny import make_tiny_model

    model = str(make_tiny_model(tmp_path / "next", arch="qwen3_next"))
    sizes = {"max_num_seqs": 2, "max_model_len": 64}
    on = build_llm_engine(NextserveConfig.from_args({"model": model, "executor": "local", "engine": {
        **sizes, "prefix_cache_states": 5, "prefix_cache_state_interval": 3}}), None)
    assert on.executor.num_state_snapshots == 5 and on.scheduler.prefix.num_states == 5
    assert on.scheduler.prefix.state_interval == 3 and on.stats.prefix_cache_state_entries == 5
    off = build_llm_engine(NextserveConfig.from_args({"model": model, "executor": "local", "engine": {
        **sizes, "enable_prefix_caching": False}}), None)
    assert off.scheduler.prefix is None and off.executor.num_state_snapshots == 0
    default = NextserveConfig.from_args({}).engine
    assert default.enable_prefix_caching and default.prefix_cache_states == 32
    with pytest.raises(NextserveConfigError, match=r"engine\.prefix_cache_states: .*greater than or equal"):
        NextserveConfig.from_args({"engine": {"prefix_cache_states": -1}})


@pytest.mark.parametrize("key", ["block_size", "num_kv_blocks"])
def test_bad_block_settings_name_the_key(key):
    with pytest.raises(NextserveConfigError, match=rf"engine\.{key}: .*greater than or equal to 1 \(got 0\)"):
        NextserveConfig.from_args({"engine": {key: 0}})


def test_a_separate_engine_process_serves_the_same_tokens_and_exits_on_shutdown(tiny_dir):
    import asyncio
    import os

    from engine.core_client import EngineCoreClient
    from engine.sampling import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def tokens(engine):
        return [t async for o in engine.generate("r", [1, 2, 3], params) for t in o.new_token_ids]

    got = {}
    for process in ("inline", "separate"):
        config = NextserveConfig.from_args({"model": str(tiny_dir), "executor": "local", "engine": {
            "max_num_seqs": 2, "max_model_len": 64, "block_size": 4, "num_kv_blocks": 10,
            "engine_process": process}})
        engine, _, max_len = build_engine(config)
        try:
            assert isinstance(engine, EngineCoreClient) == (process == "separate")
            assert max_len == 40 and engine.stats().num_kv_blocks == 10
            got[process] = asyncio.run(tokens(engine))
        finally:
            engine.shutdown()
    assert got["inline"] == got["separate"]
    with pytest.raises(ProcessLookupError):  # the core process is gone
        os.kill(engine.pid, 0)


def test_a_killed_engine_core_makes_the_replica_unhealthy(tiny_dir):
    import os
    import signal
    import time

    from deployments.server import engine_healthy

    config = NextserveConfig.from_args({"model": str(tiny_dir), "executor": "local", "engine": {
        "max_num_seqs": 2, "max_model_len": 64, "engine_process": "separate"}})
    engine, _, _ = build_engine(config)
    try:
        assert engine_healthy(engine)
        os.kill(engine.pid, signal.SIGKILL)
        for _ in range(200):
            if not engine_healthy(engine):
                break
            time.sleep(0.05)
        assert not engine_healthy(engine)  # /health answers 503; Serve's check_health fails
    finally:
        engine.shutdown()


def test_a_separate_engine_process_is_refused_for_the_cluster_executor(tiny_dir):
    config = NextserveConfig.from_args({"model": str(tiny_dir), "executor": "cluster",
                                        "engine": {"engine_process": "separate"}})
    with pytest.raises(NextserveConfigError, match=r"engine\.engine_process: separate runs only"):
        build_engine(config)  # before any Ray starts
    assert NextserveConfig.from_args({}).engine.engine_process == "auto"


def test_speculative_tokens_are_refused_without_an_mtp_layer(tiny_dir):
    # tiny_dir is a Qwen3 MoE checkpoint: no MTP layer to draft with; both executors refuse it
    # naming the key, the cluster one before any Ray starts.
    for executor in ("local", "cluster"):
        config = NextserveConfig.from_args({"model": str(tiny_dir), "executor": executor,
                                            "engine": {"speculative_tokens": 2}})
        with pytest.raises(NextserveConfigError, match=r"engine\.speculative_tokens=2 needs the checkpoint"):
            build_llm_engine(config, None)
    with pytest.raises(NextserveConfigError, match="speculative_tokens"):
        NextserveConfig.from_args({"engine": {"speculative_tokens": -1}})
    assert NextserveConfig.from_args({}).engine.speculative_tokens == 0
