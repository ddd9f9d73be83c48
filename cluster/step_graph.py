"""One engine step as a static graph of actor calls, per micro-batch lane:

    mixer(layer 0) ─► shards ─► mixer(layer 1) ─► shards ─► … ─► mixer(last layer).finish ─► logits

The same wiring runs three ways (`cluster.data_plane`). The default, cluster/dataplane.py, records
it into one static program per actor that the actor's loop runs, messages over sockets.
`CompiledStep` binds it once into a Ray Compiled Graph (shared-memory channels on one node; with
`cluster.tensor_transport: accelerator`, tensors go GPU to GPU by NCCL; an actor calling itself
uses an in-process channel), so a step costs one `execute`. `RemoteStep`
submits it as plain actor calls per step, ObjectRefs passed from actor to actor (never through the
driver): the fallback, kept for debugging and for Ray set-ups without compiled graphs. Their
cost per step against the local executor: README, "Cluster executor" (bench/cluster_step.py).

With two lanes the step's sequences are split in two micro-batches; lanes are wired layer by layer
so each actor alternates between them: while shards compute lane 0's experts of layer l, the
mixer runs lane 1's layer l (MegaScale-Infer's ping-pong). Compiled, both lanes always run (a graph
is static, and an actor serves one compiled graph at a time, so a second one-lane graph cannot
stand beside it); a step too small to split sends an empty message down lane 1. On 2 CPU cores
there is nothing to overlap on, so lanes only add hops (README): they are off by default
(`cluster.micro_batch_tokens: 0`) and meant for actors with their own GPUs or cores."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import ray
from ray.dag import DAGContext, InputNode, MultiOutputNode

from cluster.channel_wait import set_channel_poll
from cluster.messages import StepMsg, StepResult
from cluster.placement import ClusterPlacement
from model.config import ModelConfig

Call = Callable[..., Any]  # (actor, method, num_returns, *args) -> node/ref, or a list for num_returns > 1


def wire_lanes(call: Call, lanes: Sequence[Any], model: ModelConfig, placement: ClusterPlacement,
               mixers: Sequence[Any], shards: Sequence[Any]) -> list[Any]:
    """Wire every lane through all layers; returns each lane's logits node/ref."""
    S = placement.num_shards
    carry: list[Any] = [None] * len(lanes)
    partials: list[list[Any]] = [[] for _ in lanes]
    for layer in range(model.num_hidden_layers):
        mixer = mixers[placement.owner[layer]]
        for lane, msg in enumerate(lanes):
            if model.is_moe_layer(layer):
                out = call(mixer, "run", S + 1, layer, msg, carry[lane], *partials[lane])
                carry[lane] = out[0]
                partials[lane] = [call(shards[s], "run", 1, out[1 + s]) for s in range(S)]
            else:
                carry[lane] = call(mixer, "run", 1, layer, msg, carry[lane], *partials[lane])
                partials[lane] = []
    last = mixers[placement.owner[-1]]
    return [call(last, "finish", 1, msg, carry[lane], *partials[lane]) for lane, msg in enumerate(lanes)]


def _binder(tensor_transport: str) -> Call:
    """Binds calls into the graph. With a tensor transport (cluster/messages.py) every edge
    between actors, the outputs of `run`, carries its torch tensors by it; `finish` returns host
    arrays to the driver."""

    def bind(actor: Any, method: str, num_returns: int, *args: Any) -> Any:
        node = getattr(actor, method).options(num_returns=num_returns).bind(*args)
        if tensor_transport != "host" and method == "run":
            for out in (node if num_returns > 1 else (node,)):
                out.with_tensor_transport(transport=tensor_transport)
        return node

    return bind


def _remote(actor: Any, method: str, num_returns: int, *args: Any) -> Any:
    return getattr(actor, method).options(num_returns=num_returns).remote(*args)


def _copied(r: StepResult) -> StepResult:
    hidden = np.array(r.hidden, copy=True) if isinstance(r.hidden, np.ndarray) else r.hidden
    return StepResult(np.array(r.logits, copy=True), {k: np.array(v, copy=True) for k, v in r.counts.items()},
                      r.telemetry, hidden)


def _set_channel_poll(actor: Any, poll_us: float) -> float:
    return set_channel_poll(poll_us)


class RemoteStep:
    """Plain actor calls; an empty lane is not submitted at all."""

    def __init__(self, model: ModelConfig, placement: ClusterPlacement, mixers: Sequence[Any],
                 shards: Sequence[Any], timeout_s: float) -> None:
        self.args = (model, placement, mixers, shards)
        self.timeout_s = timeout_s

    def __call__(self, msgs: Sequence[StepMsg]) -> list[StepResult | None]:
        live = [m for m in msgs if m.step is not None]
        refs = wire_lanes(_remote, live, *self.args)
        # copied: arrays from the object store are read-only (and pin it while referenced)
        out = iter([_copied(r) for r in ray.get(refs, timeout=self.timeout_s)])
        return [next(out) if m.step is not None else None for m in msgs]

    def teardown(self, kill_actors: bool = False) -> None:
        pass


class CompiledStep:
    """The step graph compiled once for `num_lanes` lanes; rebuilt (torn down and compiled again)
    by the executor when the placement changes. An actor serves one compiled graph at a time."""

    def __init__(self, model: ModelConfig, placement: ClusterPlacement, mixers: Sequence[Any],
                 shards: Sequence[Any], num_lanes: int, timeout_s: float, buffer_size_bytes: int,
                 tensor_transport: str = "host", channel_poll_us: float = 0.0) -> None:
        self.timeout_s = timeout_s
        # how the driver and every actor wait on the graph's channels (cluster/channel_wait.py)
        set_channel_poll(channel_poll_us)
        ray.get([a.__ray_call__.remote(_set_channel_poll, channel_poll_us) for a in (*mixers, *shards)],
                timeout=timeout_s)
        # Teardown can wait forever on a channel after large messages (seen with 4 MiB arrays):
        # bound it, and the executor kills the actors when it is done with them anyway.
        DAGContext.get_current().teardown_timeout = min(30, int(timeout_s))
        with InputNode() as inp:
            lanes = [inp[i] for i in range(num_lanes)]
            bind = _binder(tensor_transport)
            dag = MultiOutputNode(wire_lanes(bind, lanes, model, placement, mixers, shards))
        self.graph = dag.experimental_compile(_buffer_size_bytes=buffer_size_bytes,
                                              _submit_timeout=timeout_s)
        self.num_lanes = num_lanes

    def __call__(self, msgs: Sequence[StepMsg]) -> list[StepResult | None]:
        if len(msgs) != self.num_lanes:
            raise ValueError(f"the compiled step has {self.num_lanes} lanes, got {len(msgs)} messages")
        results = ray.get(self.graph.execute(*msgs), timeout=self.timeout_s)
        # A numpy result is a view into the graph's output channel; holding it would stall the
        # next execution, so copy it out now.
        return [None if r is None else _copied(r) for r in results]

    def teardown(self, kill_actors: bool = False) -> None:
        """Stop the graph; without `kill_actors` its actors stay and take plain calls again."""
        self.graph.teardown(kill_actors=kill_actors)
