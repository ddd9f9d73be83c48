"""The cluster executor's Ray actors: the mixers and expert shards of a ClusterPlacement, in their
placement-group bundles, and the expert placement they hold. One owner for starting, stopping,
probing and replacing them; the step graph that wires them is the executor's."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from cluster.config import Pools
from cluster.placement import ClusterPlacement, MixerSpec
from cluster.session import RaySession, reserve
from cluster.workers import ExpertWorker, MixerWorker
from router.placement import ExpertPlacement, PlacementError

log = logging.getLogger(__name__)
PROBE_S = 5.0  # an actor that does not answer a ping within this is taken for dead


@dataclass(frozen=True)
class ActorArgs:
    """What every actor is built with, whatever its placement."""

    model_dir: str
    dtype: str | None
    num_slots: int
    max_model_len: int
    block_size: int
    num_kv_blocks: int
    tensor_transport: str
    timeout_s: float  # for an actor's start-up, reloading experts and compiling a decode bucket
    num_state_snapshots: int = 0  # saved DeltaNet states per DeltaNet layer (prefix caching)
    compile: bool = False  # engine.compile: mixers' decode layers and shards' experts compiled


class ActorCompileError(Exception):
    """Compiling decode batch bucket `bucket` raised in the actors of `failures` (by name)."""

    def __init__(self, bucket: int, failures: dict[str, BaseException]) -> None:
        super().__init__(f"compiling decode batch bucket {bucket} failed in {', '.join(failures)}")
        self.bucket, self.failures = bucket, failures


def _eager(worker: Any) -> None:
    """Run on an actor (`__ray_call__`): MixerWorker and ExpertWorker run every call eagerly when
    their `decode` (CompiledLayers / CompiledExperts) is None, as when started without compile."""
    worker.decode = None


def _device(pool: Any) -> str:
    """Where an actor computes: its GPU if the pool gives it one (Ray sets CUDA_VISIBLE_DEVICES)."""
    return "cuda" if pool.resources.num_gpus > 0 else "cpu"


class ActorGroup:
    """Mixers and expert shards; `actors` lists them in that order, `names` alike. Methods call
    the actors plainly, so a compiled graph must not hold them meanwhile (the executor pauses it)."""

    def __init__(self, args: ActorArgs, session: RaySession, pools: Pools,
                 placement: ClusterPlacement) -> None:
        self.args, self.session = args, session
        self._pools, self._placement = pools, placement
        self._mixers: list[Any] = []
        self._shards: list[Any] = []
        # What each shard holds; None while a reload is under way or after one failed.
        self._held: list[tuple[int, ...] | None] = []

    @property
    def placement(self) -> ClusterPlacement:
        return self._placement

    @property
    def mixers(self) -> tuple[Any, ...]:
        return tuple(self._mixers)

    @property
    def shards(self) -> tuple[Any, ...]:
        return tuple(self._shards)

    @property
    def actors(self) -> tuple[Any, ...]:
        return (*self._mixers, *self._shards)

    @property
    def names(self) -> list[str]:
        return ([m.name for m in self._placement.mixers]
                + [f"experts-{s}" for s in range(self._placement.num_shards)])

    def start(self) -> None:
        """Reserve the pools' placement groups, start every actor and wait until each has loaded."""
        reserve(self.session, self._pools, self._placement, self.args.timeout_s)
        self._mixers = [self._new_mixer(m) for m in self._placement.mixers]
        self._shards = [self._new_shard(s) for s in range(self._placement.num_shards)]
        self._held = [None] * len(self._shards)
        self._wait_ready(self.names, self.actors)
        self._held = list(self._placement.experts.shards) if self._placement.experts is not None else []

    def stop(self) -> None:
        """Kill every actor and free the placement groups."""
        for a in self.actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception as e:  # already gone
                log.debug("kill: %s", e)
        self._mixers, self._shards, self._held = [], [], []
        self.session.remove_groups()

    def find_dead(self) -> list[int]:
        """Indices into `actors` of those that are dead or do not answer."""
        refs = [a.ready.remote() for a in self.actors]
        done, _ = ray.wait(refs, num_returns=len(refs), timeout=PROBE_S)
        dead = []
        for i, ref in enumerate(refs):
            if ref not in done:
                dead.append(i)
                continue
            try:
                ray.get(ref, timeout=PROBE_S)
            except Exception:
                dead.append(i)
        return dead

    def replace(self, indices: Sequence[int]) -> list[str]:
        """Start the actors at `indices` (into `actors`) again in their bundles (Ray moves a bundle
        whose node died to a live node); returns their names."""
        names, fresh = self.names, []
        for i in indices:
            ray.kill(self.actors[i], no_restart=True)
            if i < len(self._mixers):
                self._mixers[i] = self._new_mixer(self._placement.mixers[i])
                fresh.append(self._mixers[i])
            else:
                s = i - len(self._mixers)
                self._shards[s] = self._new_shard(s)
                fresh.append(self._shards[s])
        self._wait_ready([names[i] for i in indices], fresh)
        return [names[i] for i in indices]

    def set_experts(self, experts: ExpertPlacement) -> None:
        """Move the routed experts to `experts` (same experts, same number of shards): each shard
        whose slice changes reloads it, every mixer routes to the new slices. `placement` changes
        only when all of that succeeded; after a failure, setting the old placement again reloads
        whatever shard may hold something else."""
        self.check_experts(experts)
        changed = [s for s in range(experts.num_shards) if self._held[s] != experts.shards[s]]
        for s in changed:
            self._held[s] = None
        ray.get([self._shards[s].set_experts.remote(list(experts.shards[s])) for s in changed]
                + [m.set_expert_placement.remote(experts) for m in self._mixers], timeout=self.args.timeout_s)
        for s in changed:
            self._held[s] = experts.shards[s]
        self._placement = dataclasses.replace(self._placement, experts=experts)

    def check_experts(self, experts: ExpertPlacement) -> None:
        """A placement these shards can take: the same experts on the same number of shards."""
        old = self._placement.experts
        if old is None:
            raise PlacementError("this model has no MoE layer to rebalance")
        if experts.num_experts != old.num_experts or experts.num_shards != old.num_shards:
            raise PlacementError(f"a new placement must keep {old.num_experts} experts on {old.num_shards} "
                                 f"shards, got {experts.num_experts} on {experts.num_shards}")

    def warm_up(self, bucket: int) -> dict[str, dict[str, float]]:
        """Every mixer compiles decode batch bucket `bucket` (engine.compile), and every expert
        shard its one graph (once: later calls find it made), side by side: by actor name, the
        seconds of each graph it compiled. A compile that raises in actors (no C++ compiler, an
        inductor error) raises ActorCompileError naming them, once every actor has finished."""
        refs = [m.warm_up.remote(bucket) for m in self._mixers] + [s.warm_up.remote() for s in self._shards]
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=self.args.timeout_s)
        if pending:
            raise ray.exceptions.GetTimeoutError(f"compiling decode batch bucket {bucket} took more than "
                                                 f"cluster.timeout_s ({self.args.timeout_s}s)")
        seconds: dict[str, dict[str, float]] = {}
        failed: dict[str, BaseException] = {}
        for name, ref in zip(self.names, refs, strict=True):
            try:
                seconds[name] = ray.get(ref, timeout=self.args.timeout_s)  # ready: no wait
            except ray.exceptions.RayTaskError as e:  # raised by the compile; the actor lives on
                failed[name] = e
        if failed:
            raise ActorCompileError(bucket, failed)
        return seconds

    def compile_off(self) -> None:
        """engine.compile off for these actors from now on: every step runs eagerly on each (their
        graphs are dropped; their caches, with the unused scratch room, stay), and an actor
        restarted later starts eager."""
        self.args = dataclasses.replace(self.args, compile=False)
        ray.get([a.__ray_call__.remote(_eager) for a in self.actors], timeout=self.args.timeout_s)

    def accessed_tensors(self) -> dict[str, list[str]]:
        """Checkpoint tensors each actor read, by actor name."""
        lists = ray.get([a.accessed_tensors.remote() for a in self.actors], timeout=self.args.timeout_s)
        return dict(zip(self.names, lists, strict=True))

    def _new_mixer(self, spec: MixerSpec) -> Any:
        pool = getattr(self._pools, spec.pool)
        a = self.args
        actor = ray.remote(MixerWorker).options(**self._actor_options(spec.pool, pool, spec.index))
        return actor.remote(a.model_dir, a.dtype, spec, a.num_slots, a.max_model_len, self._placement.experts,
                            _device(pool), a.block_size, a.num_kv_blocks, a.tensor_transport,
                            a.num_state_snapshots, a.compile)

    def _new_shard(self, s: int) -> Any:
        pool = self._pools.experts
        actor = ray.remote(ExpertWorker).options(**self._actor_options("experts", pool, s))
        return actor.remote(self.args.model_dir, self.args.dtype, s, self._placement.experts.shards[s],
                            _device(pool), self.args.tensor_transport,
                            self.args.num_slots if self.args.compile else 0)

    def _actor_options(self, pool_name: str, pool: Any, index: int) -> dict[str, Any]:
        r = pool.resources
        return dict(num_cpus=r.num_cpus, num_gpus=r.num_gpus, resources=dict(r.resources),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(
                        self.session.groups[pool_name], placement_group_bundle_index=index))

    def _wait_ready(self, names: list[str], actors: Sequence[Any]) -> None:
        timeout = self.args.timeout_s
        for name, actor in zip(names, actors, strict=True):
            try:
                ray.get(actor.ready.remote(), timeout=timeout)
            except ray.exceptions.RayActorError as e:  # e.g. a tensor missing from the checkpoint
                cause = str(e).strip().splitlines()[-1]
                raise ValueError(f"cluster actor {name} failed to start: {cause}") from None
            except ray.exceptions.GetTimeoutError:
                raise TimeoutError(f"cluster actor {name} did not start within {timeout}s "
                                   f"(cluster.timeout_s)") from None
