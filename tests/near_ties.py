"""Greedy references that know where they are fragile.

A request decoded in a batch is not bit-identical to the same request decoded alone: float32
GEMMs of different row counts sum in different orders (as in vLLM and every batched engine). The
last bits only matter at a near tie, where they can flip a discrete choice: the router's k-th and
(k+1)-th expert (a different expert for that token, visibly different logits from then on) or the
two likeliest next tokens. Over thousands of served tokens such a tie turns up now and then
(CI saw one: a router gap of 2.4e-7 at the 46th token of one of 60 requests).

`GreedyReference.check` therefore accepts a served sequence that equals the request alone up to
its first difference only where the reference itself had a near tie (router or top-2 logit gap
below `TIE`) at that step or an earlier one (a flipped expert for an earlier token changes what
later tokens attend to); any other difference fails with the gaps in the message. On the tiny
test models one step in ~1000 has a gap below 1e-4 and none of 3200 measured below 1e-5."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from engine.llm_engine import LLMEngine
from engine.local_executor import LocalExecutor
from engine.sampling import SamplingParams
from model.moe import TopKGate

TIE = 2e-5  # absolute gap in router or token logits; batch-order noise in float32 is ~1e-6


class GreedyReference:
    """Each prompt decoded greedily alone (float32, one slot), recording per step the smallest gap
    between a router's k-th and (k+1)-th expert logit over all MoE layers, and between the two
    likeliest tokens."""

    def __init__(self, model_dir: str | Path, max_model_len: int = 256) -> None:
        executor = LocalExecutor(model_dir, dtype="float32", num_slots=1, max_model_len=max_model_len)
        self._router_gaps: list[float] = []
        for module in executor.model.modules():
            if isinstance(module, TopKGate):
                module.register_forward_hook(self._record_router_gap)
        self.engine = LLMEngine(executor)

    def _record_router_gap(self, gate: TopKGate, inputs: tuple[torch.Tensor, ...], _out: object) -> None:
        logits = torch.nn.functional.linear(inputs[0], gate.weight).float()
        top = torch.topk(logits, gate.top_k + 1, dim=-1).values
        self._router_gaps.append((top[:, -2] - top[:, -1]).min().item())

    def decode(self, prompt: Sequence[int], max_tokens: int) -> tuple[list[int], list[float]]:
        """(tokens, gap per output token): the smallest router or top-2 token gap of the step
        that chose each token."""
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True, logprobs=True,
                                top_logprobs=2)
        self.engine.add_request("reference", list(prompt), params)
        tokens: list[int] = []
        gaps: list[float] = []
        while self.engine.has_unfinished():
            self._router_gaps.clear()
            for out in self.engine.step():
                router = min(self._router_gaps, default=float("inf"))
                for token, top in zip(out.new_token_ids, out.new_top_logprobs or (), strict=True):
                    tokens.append(token)
                    # The logprob gap of the top two equals their logit gap.
                    gaps.append(min(router, top[0][1] - top[1][1]))
        return tokens, gaps

    def check(self, prompt: Sequence[int], got: Sequence[int], max_tokens: int, what: str = "") -> None:
        alone, gaps = self.decode(prompt, max_tokens)
        got = list(got)
        if got == alone:
            return
        first = next((i for i, (a, b) in enumerate(zip(alone, got, strict=False)) if a != b),
                     min(len(alone), len(got)))
        tie = min(gaps[:first + 1])
        assert len(got) == len(alone) and tie < TIE, (
            f"{what}: served tokens differ from the request alone at output token {first} "
            f"({got[first:first + 3]} vs {alone[first:first + 3]}), and the reference's smallest "
            f"router/top-2 gap up to there was {tie:.3g} (a near tie is < {TIE}); "
            f"lengths {len(got)} / {len(alone)}")
