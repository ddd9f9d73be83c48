"""Expert load balancing (after DeepSeek's EPLB): from observed per-expert load, give the hottest
experts redundant copies and pack all copies onto the shards so that the busiest shard does as
little as possible. Pure torch, no Ray; the cluster applies the result (cluster/rebalance.py).

One placement serves every MoE layer (ExpertPlacement is one map): copies go to the experts hot
over all layers together, and packing minimises the sum over layers of each layer's busiest
shard. Simple, and right when the same experts run hot in every layer; a per-layer placement
would balance better when they do not, at the price of a map (and a router) per layer.

Legend: L MoE layers, E experts, S shards."""

from __future__ import annotations

import torch
from torch import Tensor

from router.placement import ExpertPlacement, PlacementError


def _as_2d(load: Tensor) -> Tensor:
    load = torch.as_tensor(load, dtype=torch.float64)
    return load.unsqueeze(0) if load.dim() == 1 else load  # [L, E]


def shard_loads(load: Tensor, placement: ExpertPlacement) -> Tensor:
    """[L, S] (token, expert) pairs per shard, from load [L, E] or [E]. An expert's pairs are split
    evenly between its copies, as the router splits them (router/dispatch.py)."""
    load = _as_2d(load)
    share = torch.zeros(placement.num_experts, placement.num_shards, dtype=torch.float64)  # [E, S]
    for s, ids in enumerate(placement.shards):
        share[list(ids), s] = 1.0
    share /= share.sum(dim=1, keepdim=True)
    return load @ share


def imbalance(load: Tensor, placement: ExpertPlacement) -> float:
    """Max / mean shard load, averaged over the layers that saw any pairs: a layer's expert step
    lasts as long as its busiest shard, so 1.0 is perfect and S is one shard doing everything."""
    per_shard = shard_loads(load, placement)  # [L, S]
    busy = per_shard.sum(dim=1) > 0
    if not busy.any():
        return 1.0
    per_shard = per_shard[busy]
    return float((per_shard.max(dim=1).values / per_shard.mean(dim=1)).mean())


def balance(load: Tensor, num_shards: int, num_redundant: int = 0) -> ExpertPlacement:
    """A placement of E experts plus `num_redundant` extra copies on `num_shards` shards.

    1. Copies: each extra copy goes to the expert with the highest load per copy (an expert has
       at most one copy per shard).
    2. Packing: copies in order of falling load per copy, each onto the shard, among those with
       room (ceil((E + redundant) / S) copies per shard, so memory stays even) and without that
       expert, where it least raises the sum over layers of the busiest shard's load (on ties:
       the least-loaded shard)."""
    total = _as_2d(load).sum(dim=0)  # [E]
    E = total.numel()
    if not 1 <= num_shards <= E:
        raise PlacementError(f"{num_shards} shards for {E} experts")
    if not 0 <= num_redundant <= E * (num_shards - 1):
        raise PlacementError(f"{num_redundant} redundant copies: between 0 and {E * (num_shards - 1)} "
                             f"fit on {num_shards} shards")
    copies = torch.ones(E, dtype=torch.float64)
    for _ in range(num_redundant):
        per_copy = torch.where(copies < num_shards, total / copies, -1.0)
        copies[int(per_copy.argmax())] += 1

    capacity = -(-(E + num_redundant) // num_shards)
    layers = _as_2d(load)  # [L, E]
    held: list[set[int]] = [set() for _ in range(num_shards)]
    shard_load = torch.zeros(layers.shape[0], num_shards, dtype=torch.float64)  # [L, S]
    # Heaviest first; ties by expert id so the result is deterministic.
    replicas = sorted(((float(total[e] / copies[e]), e) for e in range(E) for _ in range(int(copies[e]))),
                      key=lambda r: (-r[0], r[1]))
    for _, e in replicas:
        w = layers[:, e] / copies[e]  # [L] this copy's share of expert e's pairs in each layer
        free = [s for s in range(num_shards) if e not in held[s]]
        roomy = [s for s in free if len(held[s]) < capacity] or free  # room is a preference

        def cost(s: int, w: Tensor = w) -> tuple[float, float, int, int]:
            # What the step waits on: each layer's busiest shard, summed over layers; then the
            # shard's total, then fewer experts, then the lower index.
            peak = torch.maximum(shard_load.max(dim=1).values, shard_load[:, s] + w).sum()
            return float(peak), float(shard_load[:, s].sum()), len(held[s]), s

        s = min(roomy, key=cost)
        held[s].add(e)
        shard_load[:, s] += w
    return ExpertPlacement.from_lists(E, [sorted(h) for h in held])
