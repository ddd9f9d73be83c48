"""A replica's monitoring: the engine's step hook, per-request timing around the engine, and what
the ingress's /metrics, /dashboard and /expert_load routes read (monitoring/ defines it all)."""

from __future__ import annotations

from typing import Any

from engine.config import NextserveConfig
from engine.llm_engine import LLMEngine
from monitoring.engine_metrics import EngineMetrics
from monitoring.expert_load import ExpertLoad, active_params_ratio, even_shards
from monitoring.requests import MeteredEngine
from monitoring.sink import MetricsSink, process_sink


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
        self.engine = MeteredEngine(engine, self.sink)


def _expert_load(llm: LLMEngine, config: NextserveConfig) -> ExpertLoad | None:
    E = llm.config.num_experts
    if E == 0:
        return None
    pool = config.pools.experts
    return ExpertLoad(E, pool.experts or even_shards(E, min(pool.actors, E)))


def _active_params(llm: LLMEngine) -> float | None:
    """From the parameters the executor holds in this process (the local executor's model)."""
    model = getattr(llm.executor, "model", None)
    c = llm.config
    if model is None or c.num_experts == 0:
        return None
    total = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)
    return active_params_ratio(total, routed, c.num_experts_per_tok, c.num_experts)
