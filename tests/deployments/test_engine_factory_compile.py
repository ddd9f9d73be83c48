"""`engine.compile` in ray_config.yaml reaches the local and the cluster executor through
build_executor (off by default); compiling itself waits for the first decode step, so building
stays cheap."""

from __future__ import annotations

import pytest

from deployments.config import NextserveConfig
from deployments.engine_factory import build_executor


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("factory_compile"), arch="qwen3_moe")


def test_engine_compile_reaches_the_local_executor(tiny_dir):
    args = {"model": str(tiny_dir), "engine": {"max_num_seqs": 2, "max_model_len": 32}}
    assert build_executor(NextserveConfig.from_args(args)).decode is None
    assert NextserveConfig.from_args({}).engine.compile is False
    args["engine"]["compile"] = True
    assert build_executor(NextserveConfig.from_args(args)).decode is not None


def test_engine_compile_reaches_the_cluster_executor(tiny_dir, monkeypatch):
    """The cluster executor takes the flag (its actors compile: tests/cluster/test_cluster_compile.py);
    built here as a stand-in, so no Ray starts."""
    import cluster.executor

    made = {}
    monkeypatch.setattr(cluster.executor, "ClusterExecutor", lambda **kw: made.update(kw) or "cluster")
    config = NextserveConfig.from_args({"model": str(tiny_dir), "executor": "cluster",
                                        "engine": {"compile": True}})
    assert build_executor(config) == "cluster" and made["compile"] is True
    build_executor(config.model_copy(update={"engine": config.engine.model_copy(update={"compile": False})}))
    assert made["compile"] is False


def test_serving_compiles_in_the_background_and_generate_on_first_use(tiny_dir, monkeypatch):
    """A serving replica's engine (build_engine's inline engine and the engine core's builder)
    starts the buckets' background compile; the CLI's `generate` does not. The compile itself
    is tests/model/test_compiled.py's (here it is only recorded: it takes minutes on 2 cores)."""
    from deployments.engine_factory import build_core_engine, build_llm_engine
    from model.compiled import CompiledDecode

    started = []
    monkeypatch.setattr(CompiledDecode, "compile_in_background", lambda self: started.append(self))
    config = NextserveConfig.from_args({"model": str(tiny_dir),
                                        "engine": {"max_num_seqs": 2, "max_model_len": 32, "compile": True}})
    engine = build_llm_engine(config, None)
    assert started == []
    engine = build_core_engine(config)
    assert started == [engine.executor.decode]
    assert engine.stats.compiled_buckets == () and not engine.stats.compiling
