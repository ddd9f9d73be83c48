"""Prefill and decode timings of our real-width Qwen3-Next stacks for bench/gpu_check.py: eager
with the kernels model/kernels.py picks and with the pure-torch references, the compiled
(CUDA-graph) decode step checked against eager, and the bytes a decode step must read (the HBM
floor's numerator)."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch
from torch import nn

from bench.gpu_timing import timed
from bench.kernel_checks import TOLERANCES, Widths, randomize_, rel_err
from model import kernels
from model.batch import BatchLayout
from model.compiled import CompiledDecode
from model.config import ModelConfig
from model.decode_math import make_decode_caches
from model.decoder import CausalLM
from model.loading import materialize


def build_ours(w: Widths, layers: int, device: torch.device, dtype: torch.dtype) -> CausalLM:
    config = ModelConfig.from_hf(w.hub_config(layers, dtype=str(dtype).removeprefix("torch.")))
    with torch.device("meta"):
        lm = CausalLM(config)
    materialize(lm, device, dtype)
    randomize_(lm, seed=0)
    return lm.eval()


def sub_stack(lm: CausalLM, w: Widths, layers: int, dtype: torch.dtype) -> CausalLM:
    """A CausalLM of the first `layers` layers of `lm`, sharing its modules (no new weights)."""
    config = ModelConfig.from_hf(w.hub_config(layers, dtype=str(dtype).removeprefix("torch.")))
    with torch.device("meta"):
        shell = CausalLM(config)
    shell.model.embed_tokens, shell.model.norm = lm.model.embed_tokens, lm.model.norm
    shell.lm_head = lm.lm_head
    shell.model.layers = nn.ModuleList(list(lm.model.layers)[:layers])
    return shell.eval()


def decode_bytes(lm: CausalLM, w: Widths, batch: int, context: int) -> int:
    """Bytes one decode step must read (and, for states, write): every non-routed weight once,
    the routed experts a batch touches (expected distinct experts under uniform top-k routing),
    the DeltaNet states (float32, read and written) and the KV cache up to `context`."""
    total = 0
    for layer in lm.model.layers:
        for name, p in layer.named_parameters():
            if not name.startswith("mlp.experts."):  # routed experts: only those touched, below
                total += p.numel() * p.element_size()
        ex = getattr(layer.mlp, "experts", None)
        if ex is not None:
            per_expert = sum(t[0].numel() * t.element_size() for t in (ex.gate_up, ex.down))
            touched = w.experts * (1 - (1 - w.top_k / w.experts) ** batch)
            total += int(touched * per_expert)
        if layer.kind == "linear_attention":
            total += 2 * batch * w.value_heads * w.key_dim * w.value_dim * 4
            total += 2 * batch * layer.mixer.conv_dim * 3 * 2
        else:
            total += batch * (context + 1) * 2 * w.kv_heads * w.head_dim * 2
    return total


def time_ours(lm: CausalLM, batch: int, prompt: int, steps: int, device: torch.device,
              compiled: bool) -> dict[str, Any]:
    """Prefill of `batch` prompts of `prompt` tokens, then decode steps, eager with the chosen
    kernels and with the references; and, if `compiled`, the compiled (CUDA-graph) decode step
    with its first step's agreement with eager."""
    max_len = prompt + steps + 16
    bps = -(-max_len // 16)
    g = torch.Generator().manual_seed(batch)
    ids = torch.randint(0, lm.config.vocab_size, (batch * prompt,), generator=g).to(device)
    slots = list(range(batch))
    prefill = BatchLayout.build(slots, [0] * batch, [prompt] * batch, device=device)
    decodes = [BatchLayout.build(slots, [prompt + i] * batch, [1] * batch, device=device)
               for i in range(steps)]
    tokens = torch.randint(0, lm.config.vocab_size, (steps, batch), generator=g).to(device)
    out: dict[str, Any] = {"batch": batch, "prompt": prompt, "context": prompt + steps}
    caches = make_decode_caches(lm, batch, max_len, 16, batch * bps)
    with torch.inference_mode():
        for mode in ("auto", "reference"):
            kernels.set_kernels(lm, mode)
            key = "kernels" if mode == "auto" else "reference"
            out[f"prefill_ms_{key}"] = 1e3 * timed(lambda: lm(ids, prefill, caches), device)

            def decode_all() -> None:
                for i in range(steps):
                    lm(tokens[i], decodes[i], caches)

            lm(ids, prefill, caches)
            out[f"decode_ms_{key}"] = 1e3 * timed(decode_all, device, repeats=1) / steps
        kernels.set_kernels(lm, "auto")
        if compiled:
            try:
                time_compiled(lm, caches, ids, prefill, decodes, tokens, batch, batch * bps, device, out)
            except Exception as e:  # recorded beside the eager figures, which stand without it
                out["compiled_error"] = f"{type(e).__name__}: {str(e)[:300]}"
    return out


def time_compiled(lm: CausalLM, caches, ids, prefill, decodes, tokens, batch: int, num_blocks: int,
                  device: torch.device, out: dict[str, Any]) -> None:
    """The compiled decode step (under CUDA graphs on CUDA): its first step against eager, then
    the mean of the remaining steps."""
    steps = len(decodes)
    with torch.inference_mode():
        lm(ids, prefill, caches)
        twin = [copy.deepcopy(c) for c in caches]  # the same caches, for the compiled step
        t0 = time.perf_counter()
        decode = CompiledDecode(lm, twin, batch, num_blocks, buckets=(batch,))
        decode.warm_up()
        out["compile_s"] = time.perf_counter() - t0
        eager = lm.compute_logits(lm(tokens[0], decodes[0], caches))
        got = lm.compute_logits(decode(tokens[0], decodes[0]))
        err = rel_err(got, eager)
        out["cuda_graph_decode_rel_err"] = err
        out["cuda_graph_decode_ok"] = bool(err <= TOLERANCES["cuda_graph_decode"])
        out["cuda_graphs"] = decode.cuda_graphs

        def compiled_all() -> None:
            for i in range(1, steps):
                decode(tokens[i], decodes[i])

        out["decode_ms_compiled"] = 1e3 * timed(compiled_all, device, repeats=1) / (steps - 1)
