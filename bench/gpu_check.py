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
in time whatever a compile costs. This file runs the sections and writes the report; the
timings are bench/stack_timings.py (ours), bench/hf_timings.py (transformers), bench/op_timings.py
(attention, FP8) and bench/gpu_timing.py (clock, bandwidth, environment)."""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.gpu_timing import Clock, copy_bandwidth, environment
from bench.hf_timings import build_hf, time_hf
from bench.kernel_checks import REAL, SMALL, Widths, run_checks
from bench.op_timings import time_attention, time_fp8
from bench.stack_timings import build_ours, decode_bytes, sub_stack, time_ours

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


@dataclass
class Run:
    """One run's settings, its clock and the results so far; `save` writes them to results.json
    after every section, so a run cut short still leaves what it measured."""

    w: Widths
    device: torch.device
    dtype: torch.dtype
    layers: list[int]
    batches: list[int]
    prompt: int
    steps: int
    compiled: bool
    compiled_layers: list[int]
    out: Path
    clock: Clock
    results: dict[str, Any] = field(default_factory=dict)

    def save(self) -> None:
        self.results["elapsed_s"] = self.clock.elapsed()
        self.results["skipped"] = self.clock.skipped
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2))

    def log(self, what: str, row: dict[str, Any]) -> None:
        print(f"[{self.clock.elapsed():6.1f}s] {what} {json.dumps(row)}", flush=True)


def parser() -> argparse.ArgumentParser:
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
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device (use --device cpu for a dry run)")
    w = SMALL if a.small else REAL
    dtype = DTYPES[a.dtype or ("float32" if device.type == "cpu" else "bfloat16")]
    a.out.mkdir(parents=True, exist_ok=True)
    run = Run(w=w, device=device, dtype=dtype,
              layers=a.layers or ([1, 4] if a.small else [1, 4, 12]),
              batches=a.batch or ([1, 4] if a.small else [1, 32, 128]),
              prompt=a.prompt or (16 if a.small else 512),
              steps=a.steps or (3 if a.small else 8),
              compiled=(a.compiled or ("on" if device.type == "cuda" else "off")) == "on",
              compiled_layers=a.compiled_layers, out=a.out, clock=Clock(a.budget_s))
    env = environment(device)
    run.results.update({"env": env, "widths": dict(vars(w)), "dtype": str(dtype), "layers": run.layers,
                        "batches": run.batches, "prompt": run.prompt, "steps": run.steps})
    run.results["note"] = ("fla kernels timed" if env["fla_kernels"] else
                           "fla-core not importable: 'kernels' timings are the pure-torch reference paths")
    print(json.dumps(env), flush=True)

    check_kernels(run)
    rows = measure_ours(run)
    measure_ops(run)
    hf_rows: list[dict[str, Any]] = run.results.setdefault("transformers", [])
    if not a.no_hf:
        measure_transformers(run, hf_rows)
        compare_with_transformers(rows, hf_rows)
    run.save()
    print(summary(run.results), flush=True)
    failed = [c["check"] for c in run.results["checks"] if c["ok"] is False]
    failed += [f"cuda_graph_decode layers={r['layers']} batch={r['batch']}" for r in rows
               if r.get("cuda_graph_decode_ok") is False]
    if failed:
        print(f"FAILED checks: {failed}", flush=True)
    return 1 if failed else 0


def check_kernels(run: Run) -> None:
    """The copy bandwidth, then every kernel against its reference (bench/kernel_checks.py)."""
    results = run.results
    results["copy_bandwidth_gbs"] = copy_bandwidth(run.device) / 1e9
    print(f"copy bandwidth {results['copy_bandwidth_gbs']:.0f} GB/s", flush=True)
    results["checks"] = run_checks(run.w, run.device, run.dtype)
    for r in results["checks"]:
        print(f"[{run.clock.elapsed():6.1f}s] check {r['check']}: rel_err={r['rel_err']} ok={r['ok']} "
              f"{r['note']}", flush=True)
    run.save()


def measure_ours(run: Run) -> list[dict[str, Any]]:
    """Our stacks at every depth and batch, each beside its HBM floor; a size that fails (e.g. out
    of memory) is recorded and the next one tried."""
    w, device, clock = run.w, run.device, run.clock
    rows: list[dict[str, Any]] = run.results.setdefault("ours", [])
    lm = build_ours(w, max(run.layers), device, run.dtype)
    for n in sorted(run.layers, reverse=True):  # the deepest stack first: it matters most if time runs out
        stack = sub_stack(lm, w, n, run.dtype)
        for b in run.batches:
            if not clock.allows(f"ours layers={n} batch={b}"):
                continue
            try:
                r = {"layers": n, **time_ours(stack, b, run.prompt, run.steps, device,
                                              run.compiled and n in run.compiled_layers and clock.allows(
                                                  f"compiled layers={n} batch={b}"))}
            except Exception as e:  # e.g. out of memory: recorded, and the next size is tried
                rows.append({"layers": n, "batch": b, "error": f"{type(e).__name__}: {str(e)[:300]}"})
                print(f"ours layers={n} batch={b} failed: {e}", flush=True)
                continue
            bandwidth = run.results["copy_bandwidth_gbs"] * 1e9
            floor_s = decode_bytes(stack, w, b, run.prompt + run.steps) / bandwidth
            r["decode_ms_hbm_floor"] = 1e3 * floor_s
            r["floor_fraction_kernels"] = r["decode_ms_hbm_floor"] / r["decode_ms_kernels"]
            if "decode_ms_compiled" in r:
                r["floor_fraction_compiled"] = r["decode_ms_hbm_floor"] / r["decode_ms_compiled"]
            rows.append(r)
            run.log("ours", r)
            run.save()
    del lm, stack
    torch._dynamo.reset()  # drops the compiled graphs (and with them the CUDA graphs' pool)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def measure_ops(run: Run) -> None:
    """Decode attention and FP8 weights, each section recorded as an error row if it fails: the
    rest of the results stand without it."""
    if run.clock.allows("attention"):
        try:
            run.results["attention"] = time_attention(run.w, run.device, run.dtype, run.batches, run.prompt)
            for r in run.results["attention"]:
                run.log("attention", r)
        except Exception as e:
            run.results["attention"] = [{"error": f"{type(e).__name__}: {str(e)[:300]}"}]

    if run.clock.allows("fp8"):
        try:
            run.results["fp8"] = time_fp8(run.w, run.device, run.dtype, run.batches)
            for r in run.results["fp8"]:
                run.log("fp8", r)
        except Exception as e:
            run.results["fp8"] = [{"error": f"{type(e).__name__}: {str(e)[:300]}"}]
        run.save()
        if run.device.type == "cuda":
            torch.cuda.empty_cache()


def measure_transformers(run: Run, hf_rows: list[dict[str, Any]]) -> None:
    """transformers' model at every depth and batch; a depth that fails is recorded."""
    clock, device = run.clock, run.device
    for n in sorted(run.layers, reverse=True):  # the deepest stack first: it matters most if time runs out
        if not clock.allows(f"transformers layers={n}"):
            continue
        try:
            model = build_hf(run.w, n, device, run.dtype)
            for b in run.batches:
                if not clock.allows(f"transformers layers={n} batch={b}"):
                    continue
                r = {"layers": n, "batch": b, **time_hf(model, b, run.prompt, run.steps, device, run.dtype)}
                hf_rows.append(r)
                run.log("transformers", r)
                run.save()
            del model
        except Exception as e:  # recorded: the rest of the results stand without it
            hf_rows.append({"layers": n, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print(f"transformers layers={n} failed: {e}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def compare_with_transformers(rows: list[dict[str, Any]], hf_rows: list[dict[str, Any]]) -> None:
    """Each of our rows gets transformers' time over ours at the same depth and batch (our best
    decode step: eager with kernels or compiled)."""
    for r in (r for r in rows if "error" not in r):
        hf = next((h for h in hf_rows if (h.get("layers"), h.get("batch")) == (r["layers"], r["batch"])),
                  None)
        if hf and "decode_ms" in hf:
            best = min(r["decode_ms_kernels"], r.get("decode_ms_compiled", math.inf))
            r["vs_transformers_decode"] = hf["decode_ms"] / best
            r["vs_transformers_prefill"] = hf["prefill_ms"] / r["prefill_ms_kernels"]


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
