"""The `cluster` executor: the model taken apart into attention, DeltaNet and expert-shard actors
placed by the `pools` of ray_config.yaml, one engine step run as a static graph of their calls over
`cluster.data_plane`: our sockets data plane (cluster/dataplane.py, the default), a Ray Compiled
Graph, or plain remote calls (cluster/step_graph.py).
Gives the logits of the `local` executor (tests/cluster). The actors belong to an ActorGroup
(cluster/actors.py); the executor holds the step graph over them and one State.

Tensors travel between actors as `cluster.tensor_transport` says (cluster/messages.py): host
arrays by default, or torch tensors GPU to GPU by NCCL between GPU actors."""

from __future__ import annotations

import dataclasses
import enum
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import ray
import torch
from torch import Tensor

from cluster.actors import ActorArgs, ActorCompileError, ActorGroup
from cluster.channel_wait import auto_channel_poll_us
from cluster.config import ClusterConfig
from cluster.dataplane import SocketStep
from cluster.messages import StepMsg, StepResult, from_wire
from cluster.micro_batch import join_logits, split_step
from cluster.placement import ClusterPlacement, check_transport, resolve_placement
from cluster.recovery import ACTOR_FAILURES, describe, restart_all, restart_dead
from cluster.session import RaySession, connect
from cluster.step_graph import CompiledStep, RemoteStep
from engine.drafter import Drafter, head_only
from engine.executor import (
    DEFAULT_PREFIX_CACHE_STATES,
    Executor,
    ExecutorStateLostError,
    StepInput,
    StepTelemetry,
)
from model.batch import BatchLayout
from model.config import ModelConfig
from model.decode_math import default_buckets
from router.placement import ExpertPlacement

log = logging.getLogger(__name__)


class State(enum.Enum):
    """RUNNING: actors up, step graph built. PARKED: actors up with their caches, the compiled
    graph torn down while idle; the next step builds it. BROKEN: an actor died (or a change of the
    actors failed) and restarting did not work; the next step restarts every actor. SHUT_DOWN."""

    RUNNING = "running"
    PARKED = "parked"
    BROKEN = "broken"
    SHUT_DOWN = "shut_down"


class RebalanceError(RuntimeError):
    """A new expert placement could not be applied; the executor went back to the old one."""


class ClusterExecutor(Executor):
    # The DeltaNet actors keep the saved states, the attention actors the shared KV blocks; after a
    # restart the engine forgets every cached prefix (ExecutorStateLostError), so a survivor's or a
    # new actor's stale entries are never loaded.
    supports_prefix_caching = True

    def __init__(self, model_dir: str | Path, dtype: str | None = None, num_slots: int = 8,
                 max_model_len: int | None = None, config: ClusterConfig | None = None,
                 block_size: int = 16, num_kv_blocks: int | None = None,
                 num_state_snapshots: int = DEFAULT_PREFIX_CACHE_STATES,
                 speculative_tokens: int = 0, compile: bool = False) -> None:
        """`compile` (engine.compile): the mixer actors run decode steps' layers through compiled
        graphs, per batch bucket like the local executor, and the expert shards their calls of up to
        one row per slot (cluster/workers.py, model/compiled_actor.py CompiledLayers, CompiledExperts);
        other steps stay eager. A bucket compiles on every actor before its first step.
        `speculative_tokens` k > 0: MTP speculative decoding, the MTP layer (and the embedding and
        LM head it shares) in this process, the DeltaNet actors keeping the per-position states of
        verify steps and rolling back with the next step. Each actor computes on its pool's GPU when
        `resources.num_gpus` > 0, else on CPU; logits
        come back on CPU. `num_kv_blocks` None: every slot can hold max_model_len tokens (never
        preempts). `num_state_snapshots`: saved DeltaNet states for prefix caching, each DeltaNet
        actor keeping its layers' share."""
        self.model_dir = str(Path(model_dir).resolve())  # workers may start in another directory
        super().__init__(ModelConfig.from_dir(self.model_dir, dtype=dtype), num_slots, max_model_len,
                         block_size, num_kv_blocks, num_state_snapshots)
        self.settings = config or ClusterConfig()
        self.dtype = dtype
        if speculative_tokens < 0:
            raise ValueError(f"engine.speculative_tokens must be >= 0, got {speculative_tokens}")
        self.speculative_tokens = speculative_tokens
        self.drafter: Drafter | None = None
        if speculative_tokens:  # before any Ray starts: a checkpoint without MTP is refused here
            self.drafter = Drafter(head_only(self.model_dir, self.config), self.model_dir, speculative_tokens,
                                   (num_slots, self.max_model_len, block_size, self.num_kv_blocks),
                                   torch.device("cpu"))
        self._rollbacks: tuple[tuple[int, int], ...] = ()  # the last propose's, for the next step
        cluster = self.settings.cluster
        self.num_lanes = cluster.micro_batches if cluster.micro_batch_tokens > 0 else 1
        # engine.compile: the mixers' decode batch buckets (CompiledLayers' default for num_slots),
        # and those they have compiled since they started.
        self.decode_buckets = default_buckets(num_slots) if compile else ()
        self._compiled: set[int] = set()  # decode buckets every actor has compiled
        self._compile_error = ""  # why compile went off for good (an actor's compile raised), if it did
        self._seq = itertools.count()
        self._step: SocketStep | CompiledStep | RemoteStep | None = None
        self._state = State.SHUT_DOWN  # until the actors are up
        # Only a compiled graph's actors burn CPU while idle (they poll their channels).
        self.idle_after_s = ((cluster.idle_release_s or None) if cluster.data_plane == "compiled_graph"
                             else None)
        self._expert_counts: dict[int, Any] = {}  # layer -> [E] pairs since the last take
        # Per step since the last take; bounded, so an engine without metrics hooks never grows it.
        self._telemetry: deque[StepTelemetry] = deque(maxlen=1024)
        # Restarts so far, the last one's seconds (from the failed step to a runnable graph) and
        # what it restarted.
        self.num_recoveries, self.last_recovery_s, self.last_recovery_detail = 0, 0.0, ""
        placement = resolve_placement(self.settings.pools, self.config)  # config errors before Ray starts
        check_transport(self.settings, placement)
        self.session: RaySession = connect(cluster.ray_address, self.settings.pools)
        args = ActorArgs(self.model_dir, dtype, num_slots, self.max_model_len, block_size, self.num_kv_blocks,
                         cluster.tensor_transport, cluster.timeout_s, self.num_state_snapshots, compile)
        self._actors = ActorGroup(args, self.session, self.settings.pools, placement)
        try:
            self._actors.start()
            self._step = self._build_step()
        except BaseException:
            self.shutdown()
            raise
        self._state = State.RUNNING

    # -- what it holds -----------------------------------------------------------------------
    @property
    def state(self) -> State:
        return self._state

    @property
    def actors(self) -> ActorGroup:
        return self._actors

    @property
    def placement(self) -> ClusterPlacement:
        return self._actors.placement

    @property
    def expert_placement(self) -> ExpertPlacement | None:
        """The routed experts' placement in force now (it changes with every rebalance)."""
        return self._actors.placement.experts

    def actor_names(self) -> list[str]:
        """Names of `actors.actors`, in that order."""
        return self._actors.names

    def compiled_buckets(self) -> tuple[tuple[int, ...], bool]:
        """engine.compile: the decode buckets every actor has compiled (each before its first step,
        so none is ever compiling while steps run)."""
        return tuple(sorted(self._compiled)), False

    def compile_error(self) -> str:
        return self._compile_error

    def healthy(self) -> bool:
        """False while no step can run: until a restart (BROKEN) or ever again (SHUT_DOWN)."""
        return self._state in (State.RUNNING, State.PARKED)

    # -- changing the actors -----------------------------------------------------------------
    @contextmanager
    def _paused(self, repair: bool = False) -> Iterator[None]:
        """Tear the step graph down (the actors take plain calls again) while the body changes
        them, and build it again afterwards. If the body or the build fails, the actors may be
        half changed: BROKEN, so the next step restarts them. Only a restart (`repair`) may
        change the actors of a BROKEN executor."""
        if not (self.healthy() or (repair and self._state is State.BROKEN)):
            raise RuntimeError(f"the cluster executor is {self._state.value}")
        self._teardown_step()
        try:
            yield
            self._step = self._build_step()
        except BaseException:
            self._state = State.BROKEN
            raise
        self._state = State.RUNNING

    def _build_step(self) -> SocketStep | CompiledStep | RemoteStep:
        c, a = self.settings.cluster, self._actors
        if c.data_plane == "sockets":
            return SocketStep(self.config, a.placement, a.mixers, a.shards, self.num_lanes, c.step_timeout_s,
                              a.names)
        if c.data_plane == "compiled_graph":
            return CompiledStep(self.config, a.placement, a.mixers, a.shards, self.num_lanes,
                                c.step_timeout_s, c.buffer_size_bytes, c.tensor_transport,
                                self._channel_poll_us())
        return RemoteStep(self.config, a.placement, a.mixers, a.shards, c.step_timeout_s)

    def _channel_poll_us(self) -> float:
        """`cluster.channel_poll_us`, or where it is null the choice for these cores: a cluster this
        process started has this machine's cores (its logical CPUs may be more), another the CPUs
        its nodes declare."""
        poll = self.settings.cluster.channel_poll_us
        if poll is not None:
            return poll
        if self.session.started_ray:
            cores = float(os.cpu_count() or 1)
        else:
            cores = float(ray.cluster_resources().get("CPU", 0))
        return auto_channel_poll_us(cores, len(self._actors.actors) + 1)

    def _teardown_step(self, kill_actors: bool = False) -> None:
        step, self._step = self._step, None
        if step is not None:
            try:
                step.teardown(kill_actors=kill_actors)
            except Exception as e:  # a dead actor's channels: the rest is freed anyway
                log.warning("step graph teardown: %s", describe(e))

    def configure_step(self, data_plane: str | None = None, micro_batch_tokens: int | None = None,
                       channel_poll_us: float | None = None, micro_batches: int | None = None) -> None:
        """Rebuild the step on the same actors: `data_plane` sockets, compiled_graph or remote_calls,
        one lane or `micro_batches`, how compiled-graph channels are waited on (tests and
        bench/cluster_step.py compare them without restarting actors)."""
        update = {k: v for k, v in (("data_plane", data_plane), ("micro_batch_tokens", micro_batch_tokens),
                                    ("channel_poll_us", channel_poll_us), ("micro_batches", micro_batches))
                  if v is not None}
        # validated like the YAML, before anything is torn down: a wrong data_plane or number of
        # micro-batches, or a data plane that cannot carry the tensor transport, is refused and the
        # step stays as it was
        old = self.settings.cluster
        cluster = type(old).model_validate({**old.model_dump(), **update})
        settings = self.settings.model_copy(update={"cluster": cluster})
        check_transport(settings, self._actors.placement)
        with self._paused():
            self.settings = settings
            self.idle_after_s = ((cluster.idle_release_s or None) if cluster.data_plane == "compiled_graph"
                                 else None)
            self.num_lanes = cluster.micro_batches if cluster.micro_batch_tokens > 0 else 1

    def set_expert_placement(self, experts: ExpertPlacement) -> float:
        """Move the routed experts to `experts` between steps, keeping every cache (expert
        rebalancing, cluster/rebalance.py); returns the seconds it took. If that fails, the old
        placement is loaded again and RebalanceError raised; if even that fails, BROKEN too."""
        self._actors.check_experts(experts)  # a wrong placement changes nothing
        start = time.monotonic()
        old = self._actors.placement.experts
        failure: Exception | None = None
        with self._paused():
            try:
                self._actors.set_experts(experts)
            except Exception as e:
                failure = e
                log.warning("expert placement failed (%s); loading the old one again", describe(e))
                try:
                    self._actors.set_experts(old)
                except Exception as back:  # BROKEN (by the pause), so the next step restarts them
                    raise RebalanceError(f"the new expert placement failed ({describe(e)}) and so did going "
                                         f"back to the old one ({describe(back)}); the next step restarts "
                                         f"the actors") from back
        self._compiled.clear()  # the shards' experts changed shape: the next decode step warms up
        if failure is not None:
            raise RebalanceError(f"the new expert placement failed ({describe(failure)}); "
                                 f"the old one is back") from failure
        return time.monotonic() - start

    def accessed_tensors(self) -> dict[str, list[str]]:
        """Checkpoint tensors each actor read (a test and debugging aid)."""
        with self._paused():
            return self._actors.accessed_tensors()

    def take_expert_counts(self) -> dict[int, list[int]]:
        counts, self._expert_counts = self._expert_counts, {}
        return {layer: c.tolist() for layer, c in sorted(counts.items())}

    def take_step_telemetry(self) -> list[StepTelemetry]:
        out = list(self._telemetry)
        self._telemetry.clear()
        return out

    # -- steps -------------------------------------------------------------------------------
    def execute(self, step: StepInput) -> Tensor:
        self.check_step(step)
        if self._state is State.SHUT_DOWN:
            raise RuntimeError("the cluster executor was shut down")
        if self._state is State.BROKEN:
            raise self._recover(RuntimeError("the actors were left broken by a failed restart or "
                                             "expert placement"))
        if self._state is State.PARKED:
            try:
                self._step = self._build_step()
                self._state = State.RUNNING
            except Exception as e:  # e.g. an actor died while the graph was down: restart what is dead
                raise self._recover(e) from None
        if self._rollbacks:
            step = dataclasses.replace(step, state_rollbacks=self._rollbacks)
            self._rollbacks = ()
        split = split_step(step, self.settings.cluster.micro_batch_tokens, self.num_lanes)
        parts = split.parts
        self._compile_buckets(parts)
        want_hidden = self.drafter is not None
        msgs = [StepMsg(next(self._seq), p, lane=i, want_hidden=want_hidden) for i, p in enumerate(parts)]
        try:
            results = self._step(msgs)
        except ACTOR_FAILURES as e:  # the engine recomputes its sequences on the restarted actors
            raise self._recover(e) from None
        if self.drafter is not None:  # lane 0's tokens come first in the step, then lane 1's, ...
            hidden = torch.cat([from_wire(r.hidden, self.config.torch_dtype).to("cpu") for r in results
                                if r is not None and r.hidden is not None])
            layout = BatchLayout.build(list(step.slots), list(step.starts), list(step.lengths), "cpu",
                                       step.block_tables)
            self.drafter.record(layout, torch.tensor(step.token_ids, dtype=torch.long), hidden)
        logits = [None if r is None else from_wire(r.logits, torch.float32) for r in results]
        done = [r for r in results if r is not None]
        for r in done:
            for layer, c in r.counts.items():
                self._expert_counts[layer] = self._expert_counts.get(layer, 0) + c
        self._telemetry.append(_step_telemetry(done))
        return join_logits(split, logits)

    def _compile_buckets(self, parts: Sequence[StepInput | None]) -> None:
        """engine.compile: the batch buckets of this step's decode lanes that the mixers have not
        compiled yet, compiled now by plain calls, the step graph paused: a compile takes tens of
        seconds, far past what a step may (cluster.step_timeout_s). Once per bucket."""
        if not self.decode_buckets:
            return
        new = sorted({next(b for b in self.decode_buckets if b >= len(p.slots)) for p in parts
                      if p is not None and set(p.lengths) == {1} and not p.keep_states
                      and len(p.slots) <= self.decode_buckets[-1]} - self._compiled)
        if not new:
            return
        try:
            with self._paused():
                for bucket in new:
                    start = time.monotonic()
                    try:
                        seconds = self._actors.warm_up(bucket)
                    except ActorCompileError as e:
                        self._compile_off(e)
                        return
                    self._compiled.add(bucket)
                    log.info("cluster actors compiled decode batch bucket %d in %.1fs: %s", bucket,
                             time.monotonic() - start, seconds)
        except ACTOR_FAILURES as e:
            raise self._recover(e) from None

    def _compile_off(self, error: ActorCompileError) -> None:
        """An actor's compile raised (no C++ compiler, an inductor error): engine.compile goes off
        for this executor as a whole, on every actor alike (their graphs dropped, a restarted actor
        starts eager), and every step runs eagerly from now on, as without engine.compile. Not per
        bucket: what fails one bucket's compile (the environment, the compiler) fails the next
        too, and each try would pause the step graph again. The step graph is paused."""
        for name, cause in error.failures.items():
            log.warning("cluster actor %s failed to compile decode batch bucket %d (%s)", name, error.bucket,
                        describe(cause))
        self._actors.compile_off()
        self.decode_buckets, self._compiled = (), set()
        first = next(iter(error.failures.items()))
        self._compile_error = (f"{first[0]} failed to compile decode batch bucket {error.bucket}: "
                               f"{describe(first[1])}")
        log.warning("engine.compile is off for this cluster executor: every actor runs every step "
                    "eagerly from now on (%s)", self._compile_error)

    def propose(self, accepted: Sequence[int], next_token_ids: Sequence[int], num_drafts: Sequence[int],
                ) -> list[list[int]]:
        if self.drafter is None:
            raise RuntimeError("propose needs speculative_tokens > 0")
        drafts, rollbacks = self.drafter.propose(accepted, next_token_ids, num_drafts)
        self._rollbacks = tuple(rollbacks)  # the DeltaNet actors apply them before the next step's tokens
        return drafts

    def _recover(self, cause: BaseException) -> ExecutorStateLostError:
        """Restart the dead actors (every actor when BROKEN, or when that fails) and rebuild the
        step; the error for the engine says whether that worked."""
        start = time.monotonic()
        self._rollbacks = ()  # the kept states died with the actors; the engine recomputes
        self._compiled.clear()  # and so did the compiled graphs of the restarted ones
        if self.drafter is not None:
            self.drafter.forget()
        log.warning("cluster step failed (%s); restarting %s", describe(cause),
                    "every actor" if self._state is State.BROKEN else "the dead actors")
        # After a failed restart or change the actors may be half made: start them afresh.
        attempts = [restart_all] if self._state is State.BROKEN else [restart_dead, restart_all]
        what, error = "", None
        for attempt in attempts:
            try:
                with self._paused(repair=True):
                    what = attempt(self._actors)
                break
            except Exception as e:
                error = e
                log.warning("%s failed (%s)", attempt.__name__, describe(e))
        if self._state is State.BROKEN:
            log.error("cluster executor could not restart its actors: %s", describe(error))
            return ExecutorStateLostError(f"a cluster step failed ({describe(cause)}) and restarting "
                                          f"failed ({describe(error)})", recovered=False)
        self.last_recovery_s = time.monotonic() - start
        self.num_recoveries += 1
        self.last_recovery_detail = what
        log.warning("cluster executor recovered in %.2fs: restarted %s", self.last_recovery_s, what)
        return ExecutorStateLostError(f"a cluster step failed ({describe(cause)}); restarted {what} in "
                                      f"{self.last_recovery_s:.2f}s", recovered=True)

    def idle(self) -> None:
        """Tear the compiled graph down while no request comes: its actors poll their channels
        while it stands, which costs CPU (README, cluster benchmark). They stay alive with their
        caches; the next step compiles the graph again."""
        if self._state is State.RUNNING and isinstance(self._step, CompiledStep):
            self._teardown_step()
            self._state = State.PARKED
            log.info("cluster executor idle: compiled graph torn down until the next step")

    def shutdown(self) -> None:
        self._teardown_step(kill_actors=True)
        if hasattr(self, "_actors"):
            self._actors.stop()
        if hasattr(self, "session"):
            self.session.shutdown()
        self._state = State.SHUT_DOWN


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
