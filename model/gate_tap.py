"""Reads the gate's routing result at its boundary: a forward hook on each MoE layer's gate module
sees the expert ids it returns ([T, k], -1 for a dropped pair) and adds them up per expert, on
the gate's device, until the executor takes one step's counts. The model's code is untouched."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class GateTap:
    def __init__(self, gates: Mapping[int, nn.Module], num_experts: int) -> None:
        """`gates[layer]`: a module whose output's first element is the expert ids [T, k]."""
        self.num_experts = num_experts
        self._counts: dict[int, torch.Tensor] = {}
        self._handles = [g.register_forward_hook(self._hook(layer)) for layer, g in gates.items()]

    def _hook(self, layer: int) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self.record(layer, output[0])
        return hook

    def record(self, layer: int, ids: torch.Tensor) -> None:
        """Count expert ids [T, k] of `layer` that reached it some other way than the gate's hook
        (a compiled step calls the gate's forward itself, and hands its result here)."""
        ids = ids.flatten()  # [T·k]
        counts = torch.bincount(ids[ids >= 0], minlength=self.num_experts)  # [E]
        prev = self._counts.get(layer)
        self._counts[layer] = counts if prev is None else prev + counts

    def take(self) -> dict[int, list[int]]:
        """Pairs per expert of each layer since the last take (one step's, when called per step)."""
        counts, self._counts = self._counts, {}
        return {layer: c.tolist() for layer, c in counts.items()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
