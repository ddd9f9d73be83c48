"""Bringing the cluster's actors back after an actor or a node died during a step: every actor is
asked whether it still answers and the dead ones are started again in their placement-group
bundles (Ray moves a bundle whose node died to a live node), where they reload their weights; if
that fails, every actor is restarted from scratch. The executor pauses its step graph around this
and builds it again afterwards. The dead mixers' caches are gone and the survivors' are stale,
so the engine recomputes its sequences from their tokens (engine/llm_engine.py); a sequence
rewritten from position 0 ignores what its slot held (model/cache.py), so survivors need no
clearing. Expert shards hold only weights.

An actor serves one compiled graph at a time and a graph cannot swap one of its actors, so the
graph is rebuilt in any case; restarting only the dead keeps recovery to one actor's start-up
(a new process, its weights) instead of all of them."""

from __future__ import annotations

import time

import ray

from cluster.actors import ActorGroup
from cluster.wire import PeerLostError

# What a step raises when one of its actors (or their node) is gone: the actor's own death, a
# compiled graph's channel or a data-plane connection closed under it, or no answer within the
# step timeout.
ACTOR_FAILURES: tuple[type[BaseException], ...] = (
    ray.exceptions.RayActorError,  # ActorDiedError, ActorUnavailableError
    ray.exceptions.RayChannelError,  # RayChannelTimeoutError too
    ray.exceptions.GetTimeoutError,
    ray.exceptions.NodeDiedError,
    ray.exceptions.WorkerCrashedError,
    ray.exceptions.ObjectLostError,
    PeerLostError,  # the sockets data plane (cluster/dataplane.py)
)


def describe(error: BaseException) -> str:
    """One line: Ray's messages run to dozens of lines of context. An error raised inside an
    actor's method is told by its own type and message."""
    if isinstance(error, ray.exceptions.RayTaskError) and isinstance(error.cause, BaseException):
        error = error.cause
    lines = [ln.strip() for ln in str(error).strip().splitlines() if ln.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]


def restart_dead(actors: ActorGroup) -> str:
    """Replace the dead actors in place; says which, and where the time went."""
    start = time.monotonic()
    dead = actors.find_dead()
    probed = time.monotonic()
    names = actors.replace(dead)
    return (f"actors {', '.join(names) or '(none dead)'} (probe {probed - start:.1f}s, "
            f"start {time.monotonic() - probed:.1f}s)")


def restart_all(actors: ActorGroup) -> str:
    """Every actor afresh, with the placement the group holds."""
    actors.stop()
    actors.start()
    return "all actors"
