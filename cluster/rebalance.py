"""Expert rebalancing on a running cluster executor: move to a new ExpertPlacement between two
steps without losing a request, and the automatic policy that decides when (ray_config.yaml's
`rebalance`).

Why no request is lost: expert shards hold weights only, so a new placement asks of them just a
new slice of the checkpoint (`ExpertWorker.set_experts`, on the same actors and placement-group
bundles, so no extra GPU is needed); the mixers keep their KV caches and DeltaNet states and only
route to the new slices (`MixerWorker.set_expert_placement`). A compiled graph holds its actors,
so it is torn down (actors kept), they are updated, and it is compiled again; if a shard cannot
take its new slice, the old placement is loaded again (ClusterExecutor.set_expert_placement).
The engine loop is single-threaded, so doing this from a step hook (the policy) or from the
engine thread puts it between two steps by construction."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from cluster.config import RebalanceSettings
from router.eplb import balance, imbalance
from router.placement import ExpertPlacement, PlacementError

log = logging.getLogger(__name__)


class ExpertHost(Protocol):
    """What rebalancing needs of an executor (cluster.executor.ClusterExecutor)."""

    @property
    def expert_placement(self) -> ExpertPlacement | None: ...

    def set_expert_placement(self, experts: ExpertPlacement) -> float: ...


@dataclass(frozen=True)
class RebalanceResult:
    applied: bool
    before: float  # max / mean shard load of the observed counts under the old placement
    after: float  # the same counts under the new placement (== before when not applied)
    shards: tuple[tuple[int, ...], ...]  # the placement in force afterwards
    seconds: float = 0.0
    reason: str = ""


def rebalance(executor: ExpertHost, counts: Mapping[int, Sequence[int]] | np.ndarray,
              num_redundant: int, min_gain: float = 0.0) -> RebalanceResult:
    """EPLB over `counts` ({layer: [E]} or [L, E]); applied when it lowers max/mean shard load by
    more than `min_gain` (relative)."""
    old = executor.expert_placement
    if old is None:
        raise PlacementError("this model has no MoE layer to rebalance")
    load = torch.as_tensor(np.stack([np.asarray(c) for c in counts.values()])
                           if isinstance(counts, Mapping) else np.asarray(counts), dtype=torch.float64)
    if load.numel() == 0 or float(load.sum()) == 0:
        return RebalanceResult(False, 1.0, 1.0, old.shards, reason="no expert load observed yet")
    new = balance(load, old.num_shards, num_redundant)
    before, after = imbalance(load, old), imbalance(load, new)
    if new == old or after >= before * (1 - min_gain):
        return RebalanceResult(False, before, before, old.shards,
                               reason=f"no better placement (max/mean {before:.3f}, best found {after:.3f})")
    seconds = executor.set_expert_placement(new)
    log.info("expert rebalance: max/mean shard load %.3f -> %.3f in %.2fs", before, after, seconds)
    return RebalanceResult(True, before, after, new.shards, seconds)


class RebalancePolicy:
    """An engine step hook (LLMEngine.step_hooks): adds up the gate's counts, and every `period_s`
    rebalances when max/mean shard load exceeds `threshold`; `request()` (the `rebalance` command,
    from any thread) makes the next step do it regardless of the threshold. Runs in the engine
    thread, so between steps."""

    def __init__(self, executor: ExpertHost, settings: RebalanceSettings) -> None:
        self.executor, self.settings = executor, settings
        self._counts: dict[int, np.ndarray] = {}
        self._last = time.monotonic()
        self._requested = threading.Event()
        self.last_result: RebalanceResult | None = None

    def request(self) -> None:
        self._requested.set()

    def __call__(self, _stats: Any, _seconds: float, counts: Mapping[int, Sequence[int]]) -> None:
        for layer, c in counts.items():
            c = np.asarray(c, dtype=np.int64)
            self._counts[layer] = self._counts.get(layer, 0) + c
        forced = self._requested.is_set()
        due = self.settings.period_s > 0 and time.monotonic() - self._last >= self.settings.period_s
        if not (forced or due) or not self._counts:
            return
        self._requested.clear()
        self._last = time.monotonic()
        counts_now, self._counts = self._counts, {}  # a window per period: load shifts over time
        experts = self.executor.expert_placement
        load = torch.as_tensor(np.stack(list(counts_now.values())))
        if experts is None or (not forced and imbalance(load, experts) < self.settings.threshold):
            return
        try:
            self.last_result = rebalance(self.executor, counts_now, self.settings.redundant_experts,
                                         0.0 if forced else self.settings.min_gain)
        except Exception:  # a failed rebalance must not fail the requests of this step
            log.exception("expert rebalance failed")


def find_policy(engine: Any) -> RebalancePolicy | None:
    """The policy among the step hooks of `engine` (an LLMEngine, or an AsyncLLMEngine around one)."""
    llm = getattr(engine, "engine", engine)
    return next((h for h in getattr(llm, "step_hooks", ()) if isinstance(h, RebalancePolicy)), None)
