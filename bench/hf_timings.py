"""transformers' own Qwen3NextModel (fla's kernels where installed) on the widths of our stacks,
timed the same way for bench/gpu_check.py's comparison."""

from __future__ import annotations

import copy
import time
from typing import Any

import torch

from bench.gpu_timing import sync, timed
from bench.kernel_checks import Widths, randomize_


def build_hf(w: Widths, layers: int, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3NextConfig
    from transformers.models.qwen3_next.modeling_qwen3_next import Qwen3NextModel

    # transformers' cache counts positions on an attention layer, which a stack of fewer than 4
    # layers lacks: such a stack is built with 4 and runs its first `layers` (its forward runs
    # config.num_hidden_layers of them).
    raw = {k: v for k, v in w.hub_config(max(layers, 4)).items() if k not in ("torch_dtype", "architectures")}
    config = Qwen3NextConfig(**raw)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in bf16 directly: a float32 copy would not fit
    try:
        with torch.device(device):
            model = Qwen3NextModel(config)
    finally:
        torch.set_default_dtype(default)
    randomize_(model, seed=0)
    model.cache_config = copy.deepcopy(config)  # the cache is laid out for all 4, so it has one
    model.config.num_hidden_layers = layers
    model.layers = model.layers[:layers]  # should a forward loop over all of self.layers
    return model.eval()


def time_hf(model, batch: int, prompt: int, steps: int, device: torch.device, dtype: torch.dtype
            ) -> dict[str, Any]:
    g = torch.Generator().manual_seed(batch)
    hidden = model.config.hidden_size
    x = torch.randn(batch, prompt, hidden, generator=g).to(device=device, dtype=dtype)
    xs = torch.randn(steps, batch, 1, hidden, generator=g).to(device=device, dtype=dtype)
    from transformers import DynamicCache

    def new_cache():
        return DynamicCache(config=model.cache_config)

    out: dict[str, Any] = {}
    # Positions given: a stack of DeltaNet layers only has no attention cache to count them from.
    positions = torch.arange(prompt + steps, device=device)[None]
    with torch.inference_mode():
        out["prefill_ms"] = 1e3 * timed(lambda: model(
            inputs_embeds=x, use_cache=True, position_ids=positions[:, :prompt],
            past_key_values=new_cache()), device)
        state: dict[str, Any] = {}

        def decode_all() -> None:
            cache = model(inputs_embeds=x, use_cache=True, position_ids=positions[:, :prompt],
                          past_key_values=new_cache()).past_key_values
            sync(device)
            state["t0"] = time.perf_counter()
            for i in range(steps):
                cache = model(inputs_embeds=xs[i], past_key_values=cache, use_cache=True,
                              position_ids=positions[:, prompt + i:prompt + i + 1]).past_key_values
            sync(device)
            state["t"] = time.perf_counter() - state["t0"]

        decode_all()  # warm-up
        decode_all()
        out["decode_ms"] = 1e3 * state["t"] / steps
    return out
