"""GateTap against the gate's own output."""

from __future__ import annotations

import numpy as np
import torch

from model.gate_tap import GateTap


class _Gate(torch.nn.Module):
    def forward(self, ids):
        return ids, torch.ones_like(ids, dtype=torch.float32)


def test_gate_tap_counts_what_the_gate_returns():
    gates = {1: _Gate(), 5: _Gate()}
    tap = GateTap(gates, num_experts=4)
    gates[1](torch.tensor([[0, 1], [0, 3]]))
    gates[1](torch.tensor([[2, -1]]))  # a second micro-batch of the same step; -1: dropped pair
    gates[5](torch.tensor([[3, 3]]))
    assert tap.take() == {1: [2, 1, 1, 1], 5: [0, 0, 0, 2]}
    assert tap.take() == {}
    tap.remove()
    gates[1](torch.tensor([[0, 1]]))
    assert tap.take() == {}


def test_gate_tap_on_the_real_gate():
    from model.moe import TopKGate

    gate = TopKGate(8, 6, 2, norm_topk_prob=True)
    torch.nn.init.normal_(gate.weight)
    tap = GateTap({0: gate}, num_experts=6)
    x = torch.randn(5, 8)
    ids, _ = gate(x)
    want = np.bincount(ids.flatten().numpy(), minlength=6).tolist()
    assert tap.take() == {0: want}
