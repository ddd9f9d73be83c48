"""A replica's monitoring: the engine's step hook, per-request timing around the engine, and what
the ingress's /metrics, /dashboard and /expert_load routes read (monitoring/ defines it all)."""

from __future__ import annotations

from typing import Any

import torch

from deployments.config import NextserveConfig
from engine.llm_engine import LLMEngine
from model.decoder import CausalLM
from monitoring.engine_metrics import EngineMetrics
from monitoring.expert_load import ExpertLoad, active_params_ratio
from monitoring.requests import MeteredEngine
from monitoring.sink import MetricsSink, process_sink
from router.placement import ExpertPlacement


class ReplicaMonitor:
    def __init__(self, engine: Any, config: NextserveConfig, sink: MetricsSink | None = None) -> None:
        """`engine`: the replica's engine (AsyncLLMEngine or a test's fake); the step hook goes on
        the LLMEngine inside it when there is one."""
        self.sink = sink or process_sink()
        llm = getattr(engine, "engine", None)
        self.engine_metrics: EngineMetrics | None = None
        if isinstance(llm, LLMEngine):
            self.engine_metrics = EngineMetrics(self.sink, _expert_load(llm, config), _active_params(llm))
            llm.step_hooks.append(self.engine_metrics.on_step)
            metrics, executor = self.engine_metrics, llm.executor
            # the cluster executor's per-actor step times and router bytes ([] from the local one)
            llm.step_hooks.append(lambda *_: metrics.record_telemetry(executor.take_step_telemetry()))
        self.engine = MeteredEngine(engine, self.sink)


def _expert_load(llm: LLMEngine, config: NextserveConfig) -> ExpertLoad | None:
    E = llm.config.num_experts
    if E == 0:
        return None
    executor = llm.executor
    if hasattr(type(executor), "expert_placement"):  # the cluster executor: the placement in force
        return ExpertLoad(E, lambda: executor.expert_placement.shards)
    # One process computes every expert; per shard is what the configured pools would place.
    pool = config.pools.experts
    placement = (ExpertPlacement.from_lists(E, pool.experts) if pool.experts
                 else ExpertPlacement.even(E, min(pool.actors, E)))
    return ExpertLoad(E, placement.shards)


def _active_params(llm: LLMEngine) -> float | None:
    """From the model's parameter shapes: the model built on the meta device (no memory, no
    weights read), so it is the same for every executor, the cluster's included."""
    c = llm.config
    if c.num_experts == 0:
        return None
    with torch.device("meta"):
        model = CausalLM(c)
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    return active_params_ratio(total, routed, c.num_experts_per_tok, c.num_experts)
