"""Messages between the cluster's actors, and their tensors' wire form. Tensors travel as numpy
arrays: Ray moves those out of band (zero-copy into shared memory) where torch tensors are pickled,
measured 2-4× slower per hop. bfloat16, which numpy lacks, travels as its int16 bit pattern.

Legend: T tokens of a (micro-)batch, H hidden, k experts per token, n rows sent to one shard."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from engine.executor import StepInput


def to_wire(t: Tensor) -> np.ndarray:
    t = t.detach().cpu().contiguous()
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def from_wire(a: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A tensor over `a`'s memory (a read-only view into a channel buffer under compiled graphs):
    use it within the call, never keep it."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == torch.bfloat16 and t.dtype == torch.int16 else t


@dataclass(frozen=True)
class StepMsg:
    """One (micro-)batch of a step as every mixer sees it. `seq` numbers it, so an actor builds the
    batch layout once per (micro-)batch, not once per layer; `step` None: this lane is empty."""

    seq: int
    step: StepInput | None


@dataclass(frozen=True)
class Carry:
    """The residual stream after layer l's mixer, on its way to the mixer of layer l+1, which adds
    the shared expert (`shared`) and the routed experts' partial sums (rows[s]: rows of shard s)."""

    h: np.ndarray  # [T, H]
    shared: np.ndarray | None  # [T, H]; None: no shared expert, or h already holds the whole MLP
    rows: tuple[np.ndarray, ...]  # [n_s] long per shard; () for a dense-MLP layer
    # The gate's pairs per expert of each MoE layer so far ({layer: [E] int64}), carried to the
    # last mixer, which returns them with the logits: under a compiled graph an actor takes no
    # side calls, so the expert-load counts ride along with the step instead.
    counts: dict[int, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class StepResult:
    """What the last mixer returns: logits [R, V] float32 and the step's pairs per expert."""

    logits: np.ndarray
    counts: dict[int, np.ndarray]


@dataclass(frozen=True)
class ShardWork:
    """Layer `layer`'s rows for one expert shard: x [n, H], global expert ids [n, k] (-1: another
    shard's pair) and weights [n, k]."""

    layer: int
    x: np.ndarray
    ids: np.ndarray
    weights: np.ndarray

