"""The `cluster` executor: the model taken apart into attention, DeltaNet and expert-shard actors
placed by the `pools` of ray_config.yaml, one engine step run as a compiled graph of their calls.
Gives the logits of the `local` executor (tests/cluster).

Tensors travel between actors as `cluster.tensor_transport` says (cluster/messages.py): host
arrays by default, or torch tensors GPU to GPU by NCCL between GPU actors."""

from __future__ import annotations

import itertools
import logging
from collections import deque
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from torch import Tensor

from cluster.config import ClusterConfig, Pools
from cluster.messages import StepMsg, StepResult, from_wire
from cluster.micro_batch import join_logits, split_step
from cluster.placement import ClusterPlacement, check_transport, resolve_placement
from cluster.rebalance import apply_expert_placement
from cluster.recovery import ACTOR_FAILURES, restart
from cluster.session import RaySession, connect, reserve
from cluster.step_graph import CompiledStep, RemoteStep
from cluster.workers import ExpertWorker, MixerWorker
from engine.executor import Executor, StepInput, StepTelemetry
from model.config import ModelConfig
from router.placement import ExpertPlacement

log = logging.getLogger(__name__)


def _device(pool: Any) -> str:
    """Where an actor computes: its GPU if the pool gives it one (Ray sets CUDA_VISIBLE_DEVICES)."""
    return "cuda" if pool.resources.num_gpus > 0 else "cpu"


class ClusterExecutor(Executor):
    def __init__(self, model_dir: str | Path, dtype: str | None = None, num_slots: int = 8,
                 max_model_len: int | None = None, config: ClusterConfig | None = None,
                 device: str = "cpu", block_size: int = 16, num_kv_blocks: int | None = None) -> None:
        """`device` is accepted for the executor interface's sake and unused: each actor computes on
        its pool's GPU when `resources.num_gpus` > 0, else on CPU. Logits come back on CPU.
        `num_kv_blocks` None: every slot can hold max_model_len tokens (never preempts)."""
        self.model_dir = str(Path(model_dir).resolve())  # workers may start in another directory
        super().__init__(ModelConfig.from_dir(self.model_dir, dtype=dtype), num_slots, max_model_len,
                         block_size, num_kv_blocks)
        self.settings = config or ClusterConfig()
        self.dtype = dtype
        cluster = self.settings.cluster
        self.num_lanes = 2 if cluster.micro_batch_tokens > 0 else 1
        self._seq = itertools.count()
        self.mixers: list[Any] = []
        self.shards: list[Any] = []
        self.step_runner: CompiledStep | RemoteStep | None = None
        self.lost = False  # an actor died and restarting failed: the next step tries again
        # The compiled graph was torn down while idle (`idle`); the next step compiles it again.
        self.parked = False
        self.idle_after_s = (cluster.idle_release_s or None) if cluster.compiled_graph else None
        self._expert_counts: dict[int, Any] = {}  # layer -> [E] pairs since the last take
        # Per step since the last take; bounded, so an engine without metrics hooks never grows it.
        self._telemetry: deque[StepTelemetry] = deque(maxlen=1024)
        # Set by cluster/recovery.py: restarts so far, the last one's seconds and what it restarted.
        self.num_recoveries, self.last_recovery_s, self.last_recovery_detail = 0, 0.0, ""
        placement = resolve_placement(self.settings.pools, self.config)  # config errors before Ray starts
        check_transport(self.settings, placement)
        self.session: RaySession = connect(cluster.ray_address, self.settings.pools)
        try:
            self._start(self.settings.pools, placement)
        except BaseException:
            self.shutdown()
            raise

    # -- placement ---------------------------------------------------------------------------
    def _start(self, pools: Pools, placement: ClusterPlacement) -> None:
        timeout = self.settings.cluster.timeout_s
        reserve(self.session, pools, placement, timeout)
        self.pools, self.placement = pools, placement
        self.mixers = [self._new_mixer(m) for m in placement.mixers]
        if placement.experts is not None:
            self.shards = [self._new_shard(s) for s in range(placement.num_shards)]
        self._wait_ready(self.actor_names(), self.mixers + self.shards)
        self.step_runner = self._build_step()

    def actor_names(self) -> list[str]:
        """Names of `self.mixers + self.shards`, in that order."""
        return [m.name for m in self.placement.mixers] + [f"experts-{s}" for s in range(len(self.shards))]

    def _new_mixer(self, spec: Any) -> Any:
        pool = getattr(self.pools, spec.pool)
        actor = ray.remote(MixerWorker).options(**self._actor_options(spec.pool, pool, spec.index))
        return actor.remote(self.model_dir, self.dtype, spec, self.num_slots, self.max_model_len,
                            self.placement.experts, _device(pool), self.block_size, self.num_kv_blocks,
                            self.settings.cluster.tensor_transport)

    def _new_shard(self, s: int) -> Any:
        pool = self.pools.experts
        actor = ray.remote(ExpertWorker).options(**self._actor_options("experts", pool, s))
        return actor.remote(self.model_dir, self.dtype, s, self.placement.experts.shards[s], _device(pool),
                            self.settings.cluster.tensor_transport)

    def _wait_ready(self, names: list[str], actors: list[Any]) -> None:
        timeout = self.settings.cluster.timeout_s
        for name, actor in zip(names, actors, strict=True):
            try:
                ray.get(actor.ready.remote(), timeout=timeout)
            except ray.exceptions.RayActorError as e:  # e.g. a tensor missing from the checkpoint
                cause = str(e).strip().splitlines()[-1]
                raise ValueError(f"cluster actor {name} failed to start: {cause}") from None
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"cluster actor {name} did not start within {timeout}s "
                                   f"(cluster.timeout_s)") from None

    def _actor_options(self, pool_name: str, pool: Any, index: int) -> dict[str, Any]:
        r = pool.resources
        return dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=dict(r.resources),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.session.groups[pool_name], placement_group_bundle_index=index))

    def _build_step(self) -> CompiledStep | RemoteStep:
        c = self.settings.cluster
        if c.compiled_graph:
            runner: CompiledStep | RemoteStep = CompiledStep(
                self.config, self.placement, self.mixers, self.shards, self.num_lanes, c.step_timeout_s,
                c.buffer_size_bytes, c.tensor_transport)
        else:
            runner = RemoteStep(self.config, self.placement, self.mixers, self.shards, c.step_timeout_s)
        self.parked = False  # whoever builds the step takes it out of the idle state
        return runner

    def configure_step(self, compiled_graph: bool | None = None,
                       micro_batch_tokens: int | None = None) -> None:
        """Rebuild the step on the same actors: compiled graph or plain remote calls, one lane or
        two (tests and bench/cluster_step.py compare them without restarting actors)."""
        if self.step_runner is not None:
            self.step_runner.teardown()
            self.step_runner = None
        update = {k: v for k, v in (("compiled_graph", compiled_graph),
                                    ("micro_batch_tokens", micro_batch_tokens)) if v is not None}
        cluster = self.settings.cluster.model_copy(update=update)
        self.settings = self.settings.model_copy(update={"cluster": cluster})
        self.num_lanes = 2 if cluster.micro_batch_tokens > 0 else 1
        self.step_runner = self._build_step()

    def replace_placement(self, pools: Pools) -> None:
        """Move to a new placement: new actors (they load their new share of the checkpoint) and a
        step graph compiled again; the cached sequences are lost, so call it between requests."""
        placement = resolve_placement(pools, self.config)
        self._stop_actors()
        self._start(pools, placement)

    def take_expert_counts(self) -> dict[int, list[int]]:
        counts, self._expert_counts = self._expert_counts, {}
        return {layer: c.tolist() for layer, c in sorted(counts.items())}

    def take_step_telemetry(self) -> list[StepTelemetry]:
        out = list(self._telemetry)
        self._telemetry.clear()
        return out

    def set_expert_placement(self, experts: ExpertPlacement) -> float:
        """Move the routed experts to `experts` between steps, keeping every cache (expert
        rebalancing, cluster/rebalance.py); returns the seconds it took."""
        return apply_expert_placement(self, experts)

    def accessed_tensors(self) -> dict[str, list[str]]:
        """Checkpoint tensors each actor read. Actors answer plain calls only while no compiled
        graph holds them, so the graph is paused for this (a test and debugging aid)."""
        if self.step_runner is not None:
            self.step_runner.teardown()
            self.step_runner = None
        names = [m.name for m in self.placement.mixers] + [f"experts-{s}" for s in range(len(self.shards))]
        lists = ray.get([a.accessed_tensors.remote() for a in self.mixers + self.shards],
                        timeout=self.settings.cluster.timeout_s)
        self.step_runner = self._build_step()
        return dict(zip(names, lists, strict=True))

    # -- steps -------------------------------------------------------------------------------
    def execute(self, step: StepInput) -> Tensor:
        self.check_step(step)
        if self.lost:
            raise restart(self, RuntimeError("the last restart failed"))
        if self.parked:
            try:
                self.step_runner = self._build_step()
            except Exception as e:  # e.g. an actor died while the graph was down: restart what is dead
                raise restart(self, e) from None
        if self.step_runner is None:
            raise RuntimeError("the cluster executor was shut down")
        split = split_step(step, self.settings.cluster.micro_batch_tokens)
        parts = split.parts[: self.num_lanes]
        msgs = [StepMsg(next(self._seq), p) for p in parts]
        try:
            results = self.step_runner(msgs)
        except ACTOR_FAILURES as e:  # the engine recomputes its sequences on the restarted actors
            raise restart(self, e) from None
        logits = [None if r is None else from_wire(r.logits, torch.float32) for r in results]
        done = [r for r in results if r is not None]
        for r in done:
            for layer, c in r.counts.items():
                self._expert_counts[layer] = self._expert_counts.get(layer, 0) + c
        self._telemetry.append(_step_telemetry(done))
        return join_logits(split, logits)

    def idle(self) -> None:
        """Tear the compiled graph down while no request comes: its actors poll their channels
        (Ray 2.60 spins in `ReadAcquire`), about half a core each (README, cluster benchmark).
        They stay alive with their caches; the next step compiles the graph again (~1 s here)."""
        if isinstance(self.step_runner, CompiledStep):
            self.step_runner.teardown()
            self.step_runner, self.parked = None, True
            log.info("cluster executor idle: compiled graph torn down until the next step")

    def release(self, slots: list[int]) -> None:
        # Nothing to do: a sequence starting at 0 ignores what its slot's last owner left behind
        # (model/cache.py), so a freed slot needs no clearing on the actors.
        pass

    def shutdown(self) -> None:
        self._stop_actors()
        if hasattr(self, "session"):
            self.session.shutdown()

    def _stop_actors(self) -> None:
        if self.step_runner is not None:
            try:
                self.step_runner.teardown(kill_actors=True)
            except Exception as e:  # a dead actor: teardown still frees the rest
                log.warning("compiled graph teardown: %s", e)
            self.step_runner = None
        for a in self.mixers + self.shards:
            ray.kill(a)
        self.mixers, self.shards = [], []
        if hasattr(self, "session"):
            for pg in list(self.session.groups.values()):
                ray.util.remove_placement_group(pg)
            self.session.groups.clear()


def _step_telemetry(results: list[StepResult]) -> StepTelemetry:
    """One step's telemetry from its lanes: an actor's seconds are those of its calls in both."""
    seconds: dict[str, float] = {}
    for r in results:
        for actor, t in r.telemetry.seconds.items():
            seconds[actor] = seconds.get(actor, 0.0) + t
    # Actor names are "<pool>-<index>" (cluster/placement.py MixerSpec.name, "experts-<shard>").
    return StepTelemetry(tuple((actor.rsplit("-", 1)[0], t) for actor, t in sorted(seconds.items())),
                         sum(r.telemetry.dispatch_bytes for r in results),
                         sum(r.telemetry.combine_bytes for r in results))
