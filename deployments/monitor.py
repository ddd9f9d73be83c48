"""A replica's monitoring: the engine's step hook, per-request timing around the engine, and what
the ingress's /metrics, /dashboard and /expert_load routes read (monitoring/ defines it all)."""

from __future__ import annotations

from typing import Any

import torch

from deployments.config import NextserveConfig
from engine.core_client import EngineCoreClient
from engine.llm_engine import LLMEngine
from model.config import ModelConfig
from model.decoder import CausalLM
from monitoring.engine_metrics import EngineMetrics
from monitoring.expert_load import ExpertLoad, active_params_ratio
from monitoring.requests import MeteredEngine
from monitoring.sink import MetricsSink, process_sink
from router.placement import ExpertPlacement


class ReplicaMonitor:
    def __init__(self, engine: Any, config: NextserveConfig, sink: MetricsSink | None = None) -> None:
        """`engine`: the replica's engine (AsyncLLMEngine, EngineCoreClient or a test's fake); the
        step hook goes on the LLMEngine inside it, or on the core client, when there is one."""
        self.sink = sink or process_sink()
        llm = getattr(engine, "engine", None)
        self.engine_metrics: EngineMetrics | None = None
        if isinstance(llm, LLMEngine):
            self.engine_metrics = EngineMetrics(self.sink, _expert_load(llm.config, llm.executor, config),
                                                _active_params(llm.config))
            llm.step_hooks.append(self.engine_metrics.on_step)
            metrics, executor = self.engine_metrics, llm.executor
            # the cluster executor's per-actor step times and router bytes ([] from the local one)
            llm.step_hooks.append(lambda *_: metrics.record_telemetry(executor.take_step_telemetry()))
        elif isinstance(engine, EngineCoreClient):  # the core process sends each step's stats
            self.engine_metrics = EngineMetrics(self.sink, _expert_load(engine.model_config, None, config),
                                                _active_params(engine.model_config))
            engine.step_hooks.append(self.engine_metrics.on_step)
        self.engine = MeteredEngine(engine, self.sink)


def _expert_load(model: ModelConfig, executor: Any, config: NextserveConfig) -> ExpertLoad | None:
    E = model.num_experts
    if E == 0:
        return None
    if hasattr(type(executor), "expert_placement"):  # the cluster executor: the placement in force
        return ExpertLoad(E, lambda: executor.expert_placement.shards)
    # One process computes every expert; per shard is what the configured pools would place.
    pool = config.pools.experts
    placement = (ExpertPlacement.from_lists(E, pool.experts) if pool.experts
                 else ExpertPlacement.even(E, min(pool.actors, E)))
    return ExpertLoad(E, placement.shards)


def _active_params(c: ModelConfig) -> float | None:
    """From the model's parameter shapes: the model built on the meta device (no memory, no
    weights read), so it is the same for every executor, the cluster's included."""
    if c.num_experts == 0:
        return None
    with torch.device("meta"):
        model = CausalLM(c)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    return active_params_ratio(total, routed, c.num_experts_per_tok, c.num_experts)
