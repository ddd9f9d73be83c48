"""The replica's expert-load metrics under the local executor: per shard is what the configured
pools would place, split as the router splits (router.placement.even_split)."""

from __future__ import annotations

from types import SimpleNamespace

from deployments.config import NextserveConfig
from deployments.monitor import ReplicaMonitor
from engine.llm_engine import LLMEngine
from engine.local_executor import LocalExecutor
from monitoring.sink import MetricsSink
from router.placement import ExpertPlacement


def test_local_executor_shards_are_the_routers(hf_next_dir):
    llm = LLMEngine(LocalExecutor(hf_next_dir, dtype="float32", num_slots=2, max_model_len=32))
    config = NextserveConfig.from_args({"pools": {"experts": {"actors": 3}}})
    monitor = ReplicaMonitor(SimpleNamespace(engine=llm), config, MetricsSink(ray_export=False))
    want = ExpertPlacement.even(8, 3).shards  # 3, 3, 2 experts
    assert monitor.engine_metrics.expert_load.shards == [list(s) for s in want]
    (step,) = monitor.engine_metrics.expert_load.record({0: [1, 2, 3, 4, 5, 6, 7, 8]})
    assert step.per_shard == (6, 15, 15)
