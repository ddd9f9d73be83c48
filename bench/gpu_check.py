"""The GPU check, one script for one device session (<= 8 minutes on an H100/H200): each kernel
against its reference (bench/kernel_checks.py), then prefill and decode timings of real-width
Qwen3-Next stacks (bf16 random weights; 1, 4 and 12 layers in the 3:1 DeltaNet/attention
pattern; batch 1/32/128) for: our eager step with the kernels model/kernels.py picks, the same
with the pure-torch references, the compiled decode step under CUDA graphs, transformers' own
Qwen3NextModel (fla's kernels where installed) on the same widths, and the HBM floor (bytes a
decode step must read, divided by the measured copy bandwidth). JSON into --out.

    python -m bench.gpu_check --out DIR                      # on the GPU machine
    python -m bench.gpu_check --small --device cpu --out DIR  # CPU dry run at tiny widths

Without fla-core the kernel rows are skipped and the timings are of the reference paths, and
the JSON says so. Sections past --budget-s seconds are skipped (recorded), so the script ends
in time whatever a compile costs."""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bench.kernel_checks import REAL, SMALL, TOLERANCES, Widths, randomize_, rel_err, run_checks
from model import kernels
from model.batch import BatchLayout
from model.compiled import CompiledDecode, make_decode_caches
from model.config import ModelConfig
from model.decoder import CausalLM
from model.loading import materialize

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class Clock:
    """Elapsed seconds since the start, and whether the budget allows another section."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s, self.skipped = time.perf_counter(), budget_s, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, what: str) -> bool:
        if self.elapsed() < self.budget_s:
            return True
        self.skipped.append(what)
        print(f"[{self.elapsed():6.1f}s] budget spent: skipping {what}", flush=True)
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and written."""
    n = (1 << 30) if device.type == "cuda" else (32 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / timed(lambda: dst.copy_(src), device, repeats=5)


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


def time_fp8(w: Widths, device: torch.device, dtype: torch.dtype, sizes: list[int]) -> list[dict[str, Any]]:
    """FP8 weights kept in memory, both ways, beside bf16: DeltaNet's in_proj_qkvz as a Linear
    (block-scaled GEMM where it runs, dequantized per call) and a layer's routed experts
    (dequantized per expert on the fly), at `sizes` tokens. Milliseconds per call."""
    from model.fp8 import Fp8Experts, Fp8Linear, block_scaled_mm_works, quantize_blockwise
    from model.moe import Experts

    block = (128, 128) if w is REAL else (16, 16)
    g = torch.Generator().manual_seed(7)
    K = w.hidden
    N = w.key_heads * (2 * w.key_dim) + 2 * w.value_heads * w.value_dim
    weight = (torch.randn(N, K, generator=g) / K ** 0.5).to(device)
    dense = nn.Linear(K, N, bias=False, device=device, dtype=dtype)
    fp8 = Fp8Linear(K, N, block).to(device)
    q, s = quantize_blockwise(weight, block)
    with torch.no_grad():
        dense.weight.copy_(weight)
        fp8.weight.copy_(q)
        fp8.weight_scale_inv.copy_(s)
    scaled_ok = block_scaled_mm_works(device, dtype) if device.type == "cuda" else False
    rows = []
    with torch.inference_mode():
        for m in sizes:
            x = torch.randn(m, K, generator=g).to(device=device, dtype=dtype)
            r: dict[str, Any] = {"op": f"linear {K}->{N}", "tokens": m,
                                 "bf16_ms": 1e3 * timed(lambda x=x: dense(x), device, repeats=20)}
            fp8.kernel = "dequantize"
            r["fp8_dequantize_ms"] = 1e3 * timed(lambda x=x: fp8(x), device, repeats=20)
            if scaled_ok:
                fp8.kernel = "scaled_mm"
                r["fp8_scaled_mm_ms"] = 1e3 * timed(lambda x=x: fp8(x), device, repeats=20)
            rows.append(r)
        E, I = w.experts, w.expert_dim
        plain = Experts(K, I, range(E), E).to(device=device, dtype=dtype)
        kept = Fp8Experts(K, I, range(E), E, block, dtype).to(device)
        for j in range(0, E, 64):  # quantized in slices: a float32 copy of all experts may not fit
            sl = slice(j, j + 64)
            gu = torch.randn(min(64, E - j), 2 * I, K, device=device) / K ** 0.5
            dn = torch.randn(min(64, E - j), K, I, device=device) / I ** 0.5
            (kept.gate_up[sl], kept.gate_up_scale_inv[sl]) = quantize_blockwise(gu, block)
            (kept.down[sl], kept.down_scale_inv[sl]) = quantize_blockwise(dn, block)
            plain.gate_up[sl], plain.down[sl] = gu.to(dtype), dn.to(dtype)
        for m in sizes:
            x = torch.randn(m, K, generator=g).to(device=device, dtype=dtype)
            ids = torch.stack([torch.randperm(E, generator=g)[:w.top_k] for _ in range(m)]).to(device)
            wts = torch.rand(m, w.top_k, generator=g).to(device=device, dtype=dtype)
            rows.append({"op": f"experts {E}x{I} top-{w.top_k}", "tokens": m,
                         "bf16_ms": 1e3 * timed(lambda x=x, i=ids, v=wts: plain(x, i, v), device, repeats=10),
                         "fp8_dequantize_ms": 1e3 * timed(lambda x=x, i=ids, v=wts: kept(x, i, v), device,
                                                          repeats=10)})
    return rows


def time_attention(w: Widths, device: torch.device, dtype: torch.dtype, batches: list[int],
                   context: int) -> list[dict[str, Any]]:
    """The decode step's attention over the paged cache (gathered blocks), eagerly: SDPA (the
    CUDA choice) against the float32 einsum, every row at `context` keys. Milliseconds per call."""
    from model.attention import Attention
    from model.compiled import DecodeInputs, attention_decode

    config = ModelConfig.from_hf(w.hub_config(4))
    with torch.device(device):
        attn = randomize_(Attention(config), 0).to(dtype)
    rows = []
    bs = 16
    per_row = -(-context // bs)
    with torch.inference_mode():
        for b in batches:
            shape = (b * per_row + 1, bs, w.kv_heads, w.head_dim)
            k_cache = torch.randn(shape, device=device, dtype=dtype)
            v_cache = torch.randn(shape, device=device, dtype=dtype)
            read_at = torch.arange(b * per_row * bs, device=device).view(b, -1)[:, :context]
            inp = DecodeInputs(positions=torch.full((b,), context - 1, device=device),
                               slots=torch.arange(b, device=device),
                               fresh=torch.zeros(b, dtype=torch.bool, device=device),
                               write_at=read_at[:, -1].contiguous(), read_at=read_at,
                               kv_len=torch.full((b,), context, device=device))
            x = torch.randn(b, w.hidden, device=device, dtype=dtype)
            r: dict[str, Any] = {"batch": b, "context": context}
            for mode, key in (("kernel", "sdpa_ms"), ("reference", "einsum_ms")):
                attn.kernels = mode
                def call(x=x, i=inp, kc=k_cache, vc=v_cache) -> Tensor:
                    return attention_decode(attn, x, i, kc, vc)

                r[key] = 1e3 * timed(call, device, repeats=10)
            rows.append(r)
    return rows


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


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "device": str(device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
    for pkg in ("fla", "triton", "transformers"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception as e:  # absent, or fails to import without a GPU
            env[pkg] = f"not importable ({type(e).__name__})"
    env["fla_kernels"] = kernels.fla_ops() is not None
    env["fla_import_error"] = kernels.fla_import_error()
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="directory for results.json")
    p.add_argument("--small", action="store_true", help="tiny widths (a dry run of the whole script)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default: bfloat16 (float32 on CPU)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="default 1 4 12 (--small: 1 4)")
    p.add_argument("--batch", type=int, nargs="+", default=None, help="default 1 32 128 (--small: 1 4)")
    p.add_argument("--prompt", type=int, default=None, help="prompt tokens per sequence (512; --small 16)")
    p.add_argument("--steps", type=int, default=None, help="decode steps timed (8; --small 3)")
    p.add_argument("--no-hf", action="store_true", help="skip transformers")
    p.add_argument("--compiled", choices=("on", "off"), default=None,
                   help="the compiled/CUDA-graph decode step (default: on for CUDA, off on CPU)")
    p.add_argument("--compiled-layers", type=int, nargs="+", default=[4, 12],
                   help="stacks whose compiled step is timed (groups of 4 layers share one compile)")
    p.add_argument("--budget-s", type=float, default=390.0, help="start no section after this many seconds")
    a = p.parse_args(argv)

    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (use --device cpu for a dry run)")
    w = SMALL if a.small else REAL
    dtype = DTYPES[a.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    layers = a.layers or ([1, 4] if a.small else [1, 4, 12])
    batches = a.batch or ([1, 4] if a.small else [1, 32, 128])
    prompt = a.prompt or (16 if a.small else 512)
    steps = a.steps or (3 if a.small else 8)
    compiled = (a.compiled or ("on" if device.type == "cuda" else "off")) == "on"
    a.out.mkdir(parents=True, exist_ok=True)
    clock = Clock(a.budget_s)
    results: dict[str, Any] = {"env": environment(device), "widths": dict(vars(w)),
                               "dtype": str(dtype), "layers": layers, "batches": batches,
                               "prompt": prompt, "steps": steps}
    env = results["env"]
    results["note"] = ("fla kernels timed" if env["fla_kernels"] else
                       "fla-core not importable: 'kernels' timings are the pure-torch reference paths")
    print(json.dumps(env), flush=True)

    def save() -> None:
        results["elapsed_s"] = clock.elapsed()
        results["skipped"] = clock.skipped
        (a.out / "results.json").write_text(json.dumps(results, indent=2))

    results["copy_bandwidth_gbs"] = copy_bandwidth(device) / 1e9
    print(f"copy bandwidth {results['copy_bandwidth_gbs']:.0f} GB/s", flush=True)
    results["checks"] = run_checks(w, device, dtype)
    for r in results["checks"]:
        print(f"[{clock.elapsed():6.1f}s] check {r['check']}: rel_err={r['rel_err']} ok={r['ok']} "
              f"{r['note']}", flush=True)
    save()

    rows: list[dict[str, Any]] = results.setdefault("ours", [])
    lm = build_ours(w, max(layers), device, dtype)
    for n in sorted(layers, reverse=True):  # the deepest stack first: it matters most if time runs out
        stack = sub_stack(lm, w, n, dtype)
        for b in batches:
            if not clock.allows(f"ours layers={n} batch={b}"):
                continue
            try:
                r = {"layers": n, **time_ours(stack, b, prompt, steps, device,
                                              compiled and n in a.compiled_layers and clock.allows(
                                                  f"compiled layers={n} batch={b}"))}
            except Exception as e:  # e.g. out of memory: recorded, and the next size is tried
                rows.append({"layers": n, "batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"ours layers={n} batch={b} failed: {e}", flush=True)
                continue
            floor_s = decode_bytes(stack, w, b, prompt + steps) / (results["copy_bandwidth_gbs"] * 1e9)
            r["decode_ms_hbm_floor"] = 1e3 * floor_s
            r["floor_fraction_kernels"] = r["decode_ms_hbm_floor"] / r["decode_ms_kernels"]
            if "decode_ms_compiled" in r:
                r["floor_fraction_compiled"] = r["decode_ms_hbm_floor"] / r["decode_ms_compiled"]
            rows.append(r)
            print(f"[{clock.elapsed():6.1f}s] ours {json.dumps(r)}", flush=True)
            save()
    del lm, stack
    torch._dynamo.reset()  # drops the compiled graphs (and with them the CUDA graphs' pool)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    if clock.allows("attention"):
        try:
            results["attention"] = time_attention(w, device, dtype, batches, prompt)
            for r in results["attention"]:
                print(f"[{clock.elapsed():6.1f}s] attention {json.dumps(r)}", flush=True)
        except Exception as e:  # recorded: the rest of the results stand without it
            results["attention"] = [{"error": f"{type(e).__name__}: {str(e)[:300]}"}]

    if clock.allows("fp8"):
        try:
            results["fp8"] = time_fp8(w, device, dtype, batches)
            for r in results["fp8"]:
                print(f"[{clock.elapsed():6.1f}s] fp8 {json.dumps(r)}", flush=True)
        except Exception as e:  # recorded: the rest of the results stand without it
            results["fp8"] = [{"error": f"{type(e).__name__}: {str(e)[:300]}"}]
        save()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    hf_rows: list[dict[str, Any]] = results.setdefault("transformers", [])
    if not a.no_hf:
        for n in sorted(layers, reverse=True):  # the deepest stack first: it matters most if time runs out
            if not clock.allows(f"transformers layers={n}"):
                continue
            try:
                model = build_hf(w, n, device, dtype)
                for b in batches:
                    if not clock.allows(f"transformers layers={n} batch={b}"):
                        continue
                    r = {"layers": n, "batch": b, **time_hf(model, b, prompt, steps, device, dtype)}
                    hf_rows.append(r)
                    print(f"[{clock.elapsed():6.1f}s] transformers {json.dumps(r)}", flush=True)
                    save()
                del model
            except Exception as e:  # recorded: the rest of the results stand without it
                hf_rows.append({"layers": n, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"transformers layers={n} failed: {e}", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for r in (r for r in rows if "error" not in r):
            hf = next((h for h in hf_rows if (h.get("layers"), h.get("batch")) == (r["layers"], r["batch"])),
                      None)
            if hf and "decode_ms" in hf:
                best = min(r["decode_ms_kernels"], r.get("decode_ms_compiled", math.inf))
                r["vs_transformers_decode"] = hf["decode_ms"] / best
                r["vs_transformers_prefill"] = hf["prefill_ms"] / r["prefill_ms_kernels"]
    save()
    print(summary(results), flush=True)
    failed = [c["check"] for c in results["checks"] if c["ok"] is False]
    failed += [f"cuda_graph_decode layers={r['layers']} batch={r['batch']}" for r in rows
               if r.get("cuda_graph_decode_ok") is False]
    if failed:
        print(f"FAILED checks: {failed}", flush=True)
    return 1 if failed else 0


def summary(results: dict[str, Any]) -> str:
    lines = [f"{'layers':>6} {'batch':>5} | {'floor':>8} {'kernels':>8} {'compiled':>8} {'reference':>9} "
             f"{'hf':>8} | {'prefill':>8} {'hf pre':>8}   (ms per decode step / per prefill)"]
    hf = {(h["layers"], h["batch"]): h for h in results.get("transformers", []) if "decode_ms" in h}
    for r in results.get("ours", []):
        if "error" in r:
            lines.append(f"{r['layers']:>6} {r['batch']:>5} | error: {r['error'][:80]}")
            continue
        h = hf.get((r["layers"], r["batch"]), {})

        def f(v: float | None) -> str:
            return f"{v:8.2f}" if v is not None else f"{'-':>8}"

        lines.append(f"{r['layers']:>6} {r['batch']:>5} | {f(r['decode_ms_hbm_floor'])} "
                     f"{f(r['decode_ms_kernels'])} {f(r.get('decode_ms_compiled'))} "
                     f"{r['decode_ms_reference']:9.2f} {f(h.get('decode_ms'))} | "
                     f"{f(r['prefill_ms_kernels'])} {f(h.get('prefill_ms'))}")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
