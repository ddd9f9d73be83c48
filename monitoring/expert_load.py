"""Expert-load accounting: the gate's choices of each step, as (token, expert) pair counts per
MoE layer, turned into activation sparsity, load imbalance and per-shard load; cumulative counts
per (layer, expert) are kept for the JSON endpoint and the dashboard's heatmap.

Legend: L MoE layers (in the order first seen), E experts, S expert shards."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class LayerStep:
    """One MoE layer in one step."""

    layer: int
    num_pairs: int  # (token, expert) pairs: tokens × top-k
    active_ratio: float  # distinct experts chosen / E
    imbalance: float  # max / mean pairs per expert; 0 for an empty step
    per_shard: tuple[int, ...]  # pairs each shard computes


Shards = Sequence[Sequence[int]]


class ExpertLoad:
    def __init__(self, num_experts: int, shards: Shards | Callable[[], Shards] | None = None) -> None:
        """`shards[s]`: the experts shard s holds; an expert on several shards (a redundant copy)
        has its pairs split evenly between them, as the router does. A callable gives the
        placement in force and is asked at every step, so per-shard counts follow a rebalance
        from the next step on. Default: one shard."""
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        self.num_experts = num_experts
        fixed = [list(range(num_experts))] if shards is None else shards
        self._current: Callable[[], Shards] = fixed if callable(fixed) else (lambda: fixed)
        self._placed: Shards | None = None
        self._use(self._current())
        self.layers: list[int] = []
        self._totals: dict[int, np.ndarray] = {}  # layer -> [E] pairs since start
        self._shard_totals: dict[int, np.ndarray] = {}  # layer -> [S] pairs since start
        self.last_step: dict[int, LayerStep] = {}
        self.num_steps = 0

    def _use(self, shards: Shards) -> None:
        """Take `shards` as the placement (again) unless it is the one in use."""
        if shards is self._placed or (self._placed is not None and _same(shards, self._placed)):
            return
        lists = [list(s) for s in shards]
        held = sorted({e for s in lists for e in s})
        if held != list(range(self.num_experts)):
            raise ValueError(f"shards must hold every expert 0..{self.num_experts - 1} at least once")
        # share[e, s]: the fraction of expert e's pairs shard s computes
        share = np.zeros((self.num_experts, len(lists)))
        for s, experts in enumerate(lists):
            share[experts, s] = 1.0
        self._share = share / share.sum(axis=1, keepdims=True)
        self._placed, self.shards = shards, lists

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    def record(self, counts: Mapping[int, Sequence[int] | np.ndarray]) -> list[LayerStep]:
        """One step's pairs per expert, `counts[layer]` [E]; returns each layer's summary, its
        pairs per shard under the placement in force."""
        self._use(self._current())
        out = []
        for layer, c in sorted(counts.items()):
            c = np.asarray(c, dtype=np.int64)
            if c.shape != (self.num_experts,):
                raise ValueError(f"layer {layer}: expected {self.num_experts} counts, got shape {c.shape}")
            if layer not in self._totals:
                self._totals[layer] = np.zeros(self.num_experts, dtype=np.int64)
                self.layers = sorted(self._totals)
            self._totals[layer] += c
            step = self._summarise(layer, c)
            shards = np.asarray(step.per_shard, dtype=np.int64)
            before = self._shard_totals.get(layer)
            self._shard_totals[layer] = (shards if before is None or before.shape != shards.shape
                                         else before + shards)
            out.append(step)
        self.last_step.update((s.layer, s) for s in out)
        self.num_steps += 1
        return out

    def totals(self, layer: int) -> list[int]:
        return self._totals[layer].tolist()

    def shard_totals(self, layer: int) -> list[int]:
        """Pairs each shard computed since start, each step under the placement of its time."""
        return self._shard_totals[layer].tolist()

    def to_json(self) -> dict[str, Any]:
        """Cumulative counts per (layer, expert) and per (layer, shard), plus the last step."""
        return {
            "num_experts": self.num_experts,
            "num_steps": self.num_steps,
            "shards": self.shards,
            "layers": self.layers,
            "counts": [self.totals(layer) for layer in self.layers],  # [L][E]
            "shard_counts": [self.shard_totals(layer) for layer in self.layers],  # [L][S]
            "last_step": [
                {"layer": s.layer, "num_pairs": s.num_pairs, "active_ratio": s.active_ratio,
                 "imbalance": s.imbalance, "per_shard": list(s.per_shard)}
                for s in (self.last_step[layer] for layer in self.layers if layer in self.last_step)],
        }

    def _summarise(self, layer: int, c: np.ndarray) -> LayerStep:
        pairs = int(c.sum())
        mean = pairs / self.num_experts
        return LayerStep(layer=layer, num_pairs=pairs,
                         active_ratio=float((c > 0).sum()) / self.num_experts,
                         imbalance=float(c.max()) / mean if pairs else 0.0,
                         per_shard=tuple(self._per_shard(c).tolist()))

    def _per_shard(self, c: np.ndarray) -> np.ndarray:
        # Largest-remainder rounding keeps the shards' counts integers that add up to the pairs.
        exact = c[:, None] * self._share  # [E, S]
        floor = np.floor(exact)
        rest = (c - floor.sum(axis=1)).astype(np.int64)  # [E] pairs still to place
        order = np.argsort(-(exact - floor), axis=1, kind="stable")
        for e in np.nonzero(rest)[0]:
            floor[e, order[e, : rest[e]]] += 1
        return floor.sum(axis=0).astype(np.int64)


def _same(a: Shards, b: Shards) -> bool:
    return len(a) == len(b) and all(list(x) == list(y) for x, y in zip(a, b, strict=True))


def active_params_ratio(total_params: int, routed_expert_params: int, top_k: int, num_experts: int) -> float:
    """Share of parameters one token uses: all but the routed experts, plus top_k / E of those."""
    if total_params <= 0:
        return 0.0
    return (total_params - routed_expert_params + routed_expert_params * top_k / num_experts) / total_params
