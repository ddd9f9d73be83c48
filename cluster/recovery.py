"""Bringing the cluster executor back after an actor or a node died during a step: the step graph
is torn down, every actor is asked whether it still answers, the dead ones are started again in
their placement-group bundles (Ray moves a bundle whose node died to a live node) and reload
their weights, and the graph is compiled again. If that fails, every actor is restarted from
scratch. The dead mixers' caches are gone and the survivors' are stale, so the engine recomputes
its sequences from their tokens (engine/llm_engine.py); a sequence rewritten from position 0
ignores what its slot held (model/cache.py), so survivors need no clearing. Expert shards hold
only weights.

An actor serves one compiled graph at a time and a graph cannot swap one of its actors, so the
graph is rebuilt in any case; restarting only the dead keeps recovery to one actor's start-up
(a new process, its weights) instead of all of them."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import ray

from engine.executor import ExecutorStateLostError

if TYPE_CHECKING:
    from cluster.executor import ClusterExecutor

log = logging.getLogger(__name__)

# What a step raises when one of its actors (or their node) is gone: the actor's own death, a
# compiled graph's channel closed under it, or no answer within the step timeout.
ACTOR_FAILURES: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.RayChannelError,  # RayChannelTimeoutError too
    ray.exceptions.GetTimeoutError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.ObjectLostError,
)
PROBE_S = 5.0  # an actor that does not answer a ping within this is taken for dead


def describe(error: BaseException) -> str:
    """One line: Ray's messages run to dozens of lines of context."""
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def find_dead(actors: list[Any]) -> list[int]:
    """Indices of the actors that are dead or do not answer."""
    refs = [a.ready.remote() for a in actors]
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


def restart_dead(executor: ClusterExecutor) -> str:
    """Replace the dead actors in place and recompile; says which, and where the time went."""
    clock = [time.monotonic()]

    def lap() -> float:
        clock.append(time.monotonic())
        return clock[-1] - clock[-2]

    if executor.step_runner is not None:
        runner, executor.step_runner = executor.step_runner, None
        try:
            runner.teardown()  # the survivors take plain calls again
        except Exception as e:  # a dead actor's channels: the rest is freed anyway
            log.debug("compiled graph teardown: %s", describe(e))
    teardown_s = lap()
    names = executor.actor_names()
    actors = executor.mixers + executor.shards
    dead = find_dead(actors)
    probe_s = lap()
    fresh = []
    for i in dead:
        ray.kill(actors[i], no_restart=True)
        if i < len(executor.mixers):
            executor.mixers[i] = executor._new_mixer(executor.placement.mixers[i])
            fresh.append(executor.mixers[i])
        else:
            s = i - len(executor.mixers)
            executor.shards[s] = executor._new_shard(s)
            fresh.append(executor.shards[s])
    executor._wait_ready([names[i] for i in dead], fresh)
    start_s = lap()
    executor.step_runner = executor._build_step()
    return (f"actors {', '.join(names[i] for i in dead) or '(none dead)'} (teardown {teardown_s:.1f}s, "
            f"probe {probe_s:.1f}s, start {start_s:.1f}s, compile {lap():.1f}s)")


def restart_all(executor: ClusterExecutor) -> None:
    for actor in executor.mixers + executor.shards:  # first, so that teardown waits on no one
        try:
            ray.kill(actor, no_restart=True)
        except Exception as e:  # already gone
            log.debug("kill: %s", e)
    executor._stop_actors()
    executor._start(executor.pools, executor.placement)


def restart(executor: ClusterExecutor, cause: BaseException) -> ExecutorStateLostError:
    """Bring the executor back; the error for the engine says whether that worked. Records
    `executor.last_recovery_s` (from the failed step's end to a runnable graph)."""
    start = time.monotonic()
    log.warning("cluster step failed (%s); restarting dead actors", describe(cause))
    what = ""
    if not executor.lost:  # after a failed restart the actor lists are half made: start afresh
        try:
            what = restart_dead(executor)
        except Exception as e:
            log.warning("restarting the dead actors failed (%s); restarting all", describe(e))
    if not what:
        try:
            restart_all(executor)
            what = "all actors"
        except Exception as e:
            executor.lost = True  # the next step tries again
            log.error("cluster executor could not restart its actors: %s", describe(e))
            return ExecutorStateLostError(f"a cluster actor died ({describe(cause)}) and restarting "
                                          f"failed ({describe(e)})", recovered=False)
    executor.lost = False
    executor.last_recovery_s = time.monotonic() - start
    executor.num_recoveries += 1
    executor.last_recovery_detail = what
    log.warning("cluster executor recovered in %.2fs: restarted %s", executor.last_recovery_s, what)
    return ExecutorStateLostError(f"a cluster actor died ({describe(cause)}); restarted {what} in "
                                  f"{executor.last_recovery_s:.2f}s", recovered=True)
