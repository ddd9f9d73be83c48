"""Decode throughput of the local executor against transformers' `generate` on the same
checkpoint: greedy, fixed prompt and output lengths, batch sizes given; prints a table.

    python -m bench.decode [--model DIR] [--batch 1 16] [--new-tokens 64] [--threads 1] [--compile]

Decode tokens/s = B·(N-1) / (time to generate N tokens − time to generate 1 token), so prompt
processing is left out for both; medians over --repeats runs. --compile compares the local
executor's eager and compiled decode instead (model/compiled.py), the two runs alternating; its
first run per batch, which compiles the bucket, is timed apart and left out."""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def decode_rate(run: Callable[[int], object], batch: int, new_tokens: int, repeats: int) -> float:
    full = median_time(lambda: run(new_tokens), repeats)
    first = median_time(lambda: run(1), repeats)
    return batch * (new_tokens - 1) / max(full - first, 1e-9)


def alternating_rates(runs: dict[str, Callable[[int], object]], batch: int, new_tokens: int,
                      repeats: int) -> dict[str, float]:
    """decode_rate for several runners, their runs interleaved so that load on a shared machine
    falls on all of them alike."""
    times: dict[tuple[str, int], list[float]] = {(name, n): [] for name in runs for n in (new_tokens, 1)}
    for _ in range(repeats):
        for n in (new_tokens, 1):
            for name, run in runs.items():
                t0 = time.perf_counter()
                run(n)
                times[name, n].append(time.perf_counter() - t0)
    return {name: batch * (new_tokens - 1) / max(statistics.median(times[name, new_tokens])
                                                  - statistics.median(times[name, 1]), 1e-9)
            for name in runs}


def compare_compiled(model_dir: Path, prompts: list[list[int]], new_tokens: int, repeats: int) -> None:
    """One table row; `graphs`: graphs torch.compile made for this batch size, the first step's
    and any recompile (context lengths grow by new_tokens during the runs)."""
    from torch._dynamo.utils import counters

    b = len(prompts)
    eager = nextserve_runner(model_dir, prompts)
    compiled = nextserve_runner(model_dir, prompts, compile=True)
    graphs = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    compiled(2)  # a prefill and one decode step, which compiles the bucket
    first = time.perf_counter() - t0
    eager(2)
    rates = alternating_rates({"eager": eager, "compiled": compiled}, b, new_tokens, repeats)
    graphs = counters["stats"]["unique_graphs"] - graphs
    print(f"{b:>5} {rates['eager']:>11.1f} {rates['compiled']:>14.1f} "
          f"{rates['eager'] / rates['compiled']:>20.3f}x {first:>16.1f} {graphs:>6}")


def nextserve_runner(model_dir: Path, prompts: list[list[int]],
                     compile: bool = False) -> Callable[[int], object]:
    from engine.llm_engine import LLMEngine
    from engine.local_executor import LocalExecutor
    from engine.sampling import SamplingParams

    executor = LocalExecutor(model_dir, dtype="float32", num_slots=len(prompts), max_model_len=1024,
                             compile=compile)
    engine = LLMEngine(executor, max_num_batched_tokens=4096)

    def run(n: int) -> object:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        out = engine.generate(prompts, params)
        assert all(len(c.token_ids) == n for c in out)
        return out
    return run


def transformers_runner(model_dir: Path, prompts: list[list[int]]) -> Callable[[int], object]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(prompts)

    def run(n: int) -> object:
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                 min_new_tokens=n, do_sample=False, pad_token_id=0)
        assert out.shape[1] == ids.shape[1] + n
        return out
    return run


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint dir (default: the built-in tiny Qwen3-Next)")
    ap.add_argument("--arch", default="qwen3_next", choices=["qwen3_next", "qwen3_moe"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--compile", action="store_true",
                    help="compare eager and compiled decode of the local executor (no transformers)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    tmp = None
    model_dir = args.model
    if model_dir is None:
        from model.tiny import make_tiny_model

        tmp = tempfile.TemporaryDirectory()
        model_dir = make_tiny_model(Path(tmp.name) / "tiny", arch=args.arch)

    print(f"model {model_dir}  prompt {args.prompt_len}  new tokens {args.new_tokens}  "
          f"threads {args.threads}  float32  median of {args.repeats}")
    if args.compile:
        print(f"{'batch':>5} {'eager tok/s':>11} {'compiled tok/s':>14} {'compiled/eager step':>21} "
              f"{'first step (s)':>16} {'graphs':>6}")
    else:
        print(f"{'batch':>5} {'nextserve tok/s':>16} {'transformers tok/s':>19} {'ratio':>6}")
    from model.config import ModelConfig

    vocab = ModelConfig.from_dir(model_dir).vocab_size
    for b in args.batch:
        g = torch.Generator().manual_seed(b)
        prompts = torch.randint(3, vocab, (b, args.prompt_len), generator=g).tolist()
        if args.compile:
            compare_compiled(model_dir, prompts, args.new_tokens, args.repeats)
            continue
        ours = decode_rate(nextserve_runner(model_dir, prompts), b, args.new_tokens, args.repeats)
        ref = decode_rate(transformers_runner(model_dir, prompts), b, args.new_tokens, args.repeats)
        print(f"{b:>5} {ours:>16.1f} {ref:>19.1f} {ours / ref:>5.2f}x")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
