"""Messages between the cluster's actors, and their tensors' wire form, chosen by
`cluster.tensor_transport`:
- host (the default): numpy arrays on the host. Ray moves those out of band (zero-copy into shared
  memory) where torch tensors are pickled, which is slower per hop on CPU (README, "Cluster
  executor"). bfloat16, which numpy lacks, travels as its int16 bit pattern.
- accelerator, shm: the torch tensors themselves, left on the actor's device; the step graph marks
  its edges with Ray's tensor transport (cluster/step_graph.py), which lifts them out of the
  message and moves them GPU to GPU (NCCL) or through shared memory.
The logits the last mixer returns to the driver are always host arrays.

Legend: T tokens of a (micro-)batch, H hidden, k experts per token, n rows sent to one shard."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from engine.executor import StepInput

Wired = np.ndarray | Tensor


def to_wire(t: Tensor, host: bool = True) -> Wired:
    if host and t.device.type == "cpu" and t.dtype != torch.bfloat16 and not t.requires_grad \
            and t.is_contiguous():
        return t.numpy()  # the common case on CPU without a dispatch per step below (~2 µs each, 5 a layer)
    t = t.detach().contiguous()
    if not host:
        return t
    t = t.cpu()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_wire(a: Wired, dtype: torch.dtype) -> Tensor:
    """A tensor over `a`'s memory (a read-only view into a channel buffer under compiled graphs):
    use it within the call, never keep it. `dtype`: the model's, to tell bfloat16 bits from int16."""
    if isinstance(a, Tensor):
        return a
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 and t.dtype == torch.int16 else t


@dataclass(frozen=True)
class StepMsg:
    """One (micro-)batch of a step as every mixer sees it. `seq` numbers it, so an actor builds the
    batch layout once per (micro-)batch, not once per layer; `step` None: this lane is empty."""

    seq: int
    step: StepInput | None
    lane: int = 0  # micro-batch lane: lane 0 reaches every layer first and carries the state copies
    want_hidden: bool = False  # speculative decoding: the last mixer returns every token's hidden state


@dataclass(frozen=True)
class Telemetry:
    """What a (micro-)batch cost on its way through the graph, gathered as it goes (like the expert
    counts, since actors under a compiled graph take no side calls): the seconds each actor spent
    in its calls, by actor name, and the bytes the router moved (dispatch: rows, expert ids and
    weights to the shards; combine: their partial sums back)."""

    seconds: dict[str, float] = field(default_factory=dict)
    dispatch_bytes: int = 0
    combine_bytes: int = 0

    def add(self, actor: str, seconds: float, dispatch_bytes: int = 0, combine_bytes: int = 0) -> Telemetry:
        return Telemetry({**self.seconds, actor: self.seconds.get(actor, 0.0) + seconds},
                         self.dispatch_bytes + dispatch_bytes, self.combine_bytes + combine_bytes)


@dataclass(frozen=True)
class Carry:
    """The residual stream after layer l's mixer, on its way to the mixer of layer l+1, which adds
    the shared expert (`shared`) and the routed experts' partial sums (rows[s]: rows of shard s)."""

    h: Wired  # [T, H]
    shared: Wired | None  # [T, H]; None: no shared expert, or h already holds the whole MLP
    rows: tuple[Wired | None, ...]  # [n_s] long per shard (None: all rows); () for a dense-MLP layer
    # The gate's pairs per expert of every MoE layer ([M, E] int32, row i: the i-th MoE layer;
    # zeros for layers not yet run; None before the first), carried to the last mixer, which
    # returns them with the logits: under a compiled graph an actor takes no side calls, so the
    # expert-load counts ride along with the step. One fixed array, not one per layer so far:
    # pickling a dict of arrays grew with depth (README, "Hops at real depth").
    counts: np.ndarray | None = None
    telemetry: Telemetry = field(default_factory=Telemetry)


def count_pairs(counts: np.ndarray | None, num_moe_layers: int, row: int, layer_counts: np.ndarray,
                ) -> np.ndarray:
    """`counts` [M, E] with row `row` set to `layer_counts` [E]: a new array (an input is a
    read-only view into a channel buffer, or the array an earlier call of this actor returned)."""
    out = (np.zeros((num_moe_layers, layer_counts.shape[0]), np.int32) if counts is None
           else np.array(counts, dtype=np.int32, copy=True))
    out[row] = layer_counts
    return out


def counts_by_layer(counts: np.ndarray | None, moe_layers: tuple[int, ...]) -> dict[int, np.ndarray]:
    """{layer: [E] int64} of the MoE layers a step ran, from a Carry's `counts`."""
    return {} if counts is None else {layer: counts[i].astype(np.int64) for i, layer in enumerate(moe_layers)}


@dataclass(frozen=True)
class StepResult:
    """What the last mixer returns: logits [R, V] float32, the step's pairs per expert and what the
    step cost per actor."""

    logits: np.ndarray
    counts: dict[int, np.ndarray]
    telemetry: Telemetry = field(default_factory=Telemetry)
    hidden: Wired | None = None  # [T, H] final-normed, with StepMsg.want_hidden (the drafter's input)


@dataclass(frozen=True)
class ShardWork:
    """Layer `layer`'s rows for one expert shard: x [n, H], global expert ids [n, k] (-1: another
    shard's pair) and weights [n, k]."""

    layer: int
    x: Wired
    ids: Wired
    weights: Wired

    @property
    def nbytes(self) -> int:
        return self.x.nbytes + self.ids.nbytes + self.weights.nbytes


@dataclass(frozen=True)
class ShardResult:
    """An expert shard's answer to a ShardWork: the weighted partial sums of its rows [n, H] and
    the seconds the shard spent computing them."""

    partial: Wired
    seconds: float

