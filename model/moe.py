"""Feed-forward blocks: the dense/shared SwiGLU MLP, the top-k gate, a set of routed experts
(all of them, or one shard's slice), and the sparse MoE block that joins them.

Legend: T tokens, H hidden, E experts held, I expert intermediate size, k experts per token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from model.config import ModelConfig
from model.kernels import moe_backend


class MLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class TopKGate(nn.Module):
    """softmax over all experts in float32 → top-k → optional renormalisation → model dtype."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, norm_topk_prob: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(num_experts, hidden))
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [T, H] -> expert ids [T, k] (long), weights [T, k] (dtype of x)."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return ids, weights.to(logits.dtype)


def local_expert_index(expert_ids: Sequence[int], num_experts: int) -> Tensor:
    """[num_experts + 1]: global id -> stacked index, -1 where not held; entry -1 (id -1) is -1."""
    local = torch.full((num_experts + 1,), -1, dtype=torch.long)
    if expert_ids:
        local[torch.tensor(list(expert_ids), dtype=torch.long)] = torch.arange(len(expert_ids))
    return local


class Experts(nn.Module):
    """The routed experts of one layer that this process holds, stacked: gate_up [E, 2I, H]
    (gate rows first), down [E, H, I]. `expert_ids[j]` is the global id of stacked expert j."""

    def __init__(self, hidden: int, intermediate: int, expert_ids: Sequence[int], num_experts: int) -> None:
        super().__init__()
        self.expert_ids = tuple(int(e) for e in expert_ids)
        self.gate_up = nn.Parameter(torch.zeros(len(self.expert_ids), 2 * intermediate, hidden))
        self.down = nn.Parameter(torch.zeros(len(self.expert_ids), hidden, intermediate))
        self.register_buffer("local_index", local_expert_index(self.expert_ids, num_experts),
                             persistent=False)
        self.kernels = "auto"  # model/kernels.py: grouped GEMM where torch has one

    def forward(self, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        """x [T, H], ids [T, k] global expert ids (-1: skip), weights [T, k] -> Σ_k w·expert(x) over
        the held experts, [T, H]. Pairs routed to experts held elsewhere contribute nothing."""
        out = torch.zeros_like(x)
        k = ids.shape[1]
        local = self.local_index[ids].flatten()  # [T·k] stacked index, -1 where not held
        pairs = (local >= 0).nonzero().squeeze(1)
        if pairs.numel() == 0:
            return out
        # Group the (token, expert) pairs by expert: one grouped GEMM per projection.
        pairs = pairs[torch.argsort(local[pairs], stable=True)]
        counts = torch.bincount(local[pairs], minlength=len(self.expert_ids))
        rows = pairs // k
        y = self._swiglu(x[rows], counts, self.gate_up, self.down)  # [P, H]
        y = y * weights.flatten()[pairs, None]
        return out.index_add_(0, rows, y.to(out.dtype))

    def gathered(self, j: Tensor) -> tuple[Tensor, Tensor]:
        """Stacked experts j (any shape [...]) -> their gate_up [..., 2I, H] and down [..., H, I]."""
        return self.gate_up[j], self.down[j]

    def _swiglu(self, xs: Tensor, counts: Tensor, gate_up: Tensor, down: Tensor) -> Tensor:
        """xs [P, H] sorted by expert, counts [E'] rows per expert of gate_up [E', 2I, H] and
        down [E', H, I] -> down(silu(gate)·up) [P, H]."""
        if moe_backend(xs, gate_up, self.kernels) == "grouped_mm":
            offs = torch.cumsum(counts, 0, dtype=torch.int32)
            gate, up = F.grouped_mm(xs, gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)
            return F.grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)
        out, start = [], 0
        for j, n in enumerate(counts.tolist()):  # the reference: one expert at a time
            if n:
                gate, up = F.linear(xs[start:start + n], gate_up[j]).chunk(2, dim=-1)
                out.append(F.linear(F.silu(gate) * up, down[j]))
                start += n
        return torch.cat(out)


class SparseMoeBlock(nn.Module):
    """Routed experts + (Qwen3-Next) a shared expert behind a per-token sigmoid gate."""

    def __init__(self, config: ModelConfig, expert_ids: Sequence[int] | None = None) -> None:
        super().__init__()
        c = config
        self.gate = TopKGate(c.hidden_size, c.num_experts, c.num_experts_per_tok, c.norm_topk_prob)
        ids = range(c.num_experts) if expert_ids is None else expert_ids
        self.experts = Experts(c.hidden_size, c.moe_intermediate_size, ids, c.num_experts)
        self.shared_expert: MLP | None = None
        self.shared_expert_gate: nn.Linear | None = None
        if c.shared_expert_intermediate_size > 0:
            self.shared_expert = MLP(c.hidden_size, c.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(c.hidden_size, 1, bias=False)

    def shared(self, x: Tensor) -> Tensor | None:
        if self.shared_expert is None or self.shared_expert_gate is None:
            return None
        return torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)

    def forward(self, x: Tensor) -> Tensor:
        ids, weights = self.gate(x)
        out = self.experts(x, ids, weights)
        shared = self.shared(x)
        return out if shared is None else out + shared
