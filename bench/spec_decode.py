"""MTP speculative decoding through the engine (local executor, or --executor cluster): decode
tokens/s and time per output token with k = 0 (off), 1, 2, 3 draft tokens per step, at several batch
sizes, on the trained built-in model and held-out prompts, greedy, float32; with the acceptance rate
per draft position.

    PYTHONPATH=$PWD flock /tmp/bench.lock .venv/bin/python -m bench.spec_decode \
        [--model models/tiny-qwen3-next] [--batch 1 8 32] [-k 0 1 2 3] [--new-tokens 64] [--executor cluster]

Decode tok/s = B·(N-1) / (time to generate N tokens − time to generate 1), so the prefill is left out
(as bench/decode.py); TPOT = that time / (N-1), what one sequence waits per token. The runs of the
different k alternate, so that load on a shared machine falls on all alike (with the cluster
executor one k after another, each executor shut down before the next starts: a standing compiled
graph keeps its actors polling); medians over --repeats.
Every k must produce the same tokens as k = 0 (checked)."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def runner(model_dir: Path, prompts: list[list[int]], k: int, executor_kind: str = "local",
           ) -> tuple[Callable[[int], list], object]:
    from engine.llm_engine import LLMEngine
    from engine.sampling import SamplingParams

    sizes = dict(dtype="float32", num_slots=len(prompts), max_model_len=512, speculative_tokens=k)
    if executor_kind == "cluster":
        from cluster.executor import ClusterExecutor

        executor = ClusterExecutor(model_dir, **sizes)
    else:
        from engine.local_executor import LocalExecutor

        executor = LocalExecutor(model_dir, **sizes)
    engine = LLMEngine(executor, max_num_batched_tokens=4096)

    def run(n: int) -> list:
        out = engine.generate(prompts, SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True))
        assert all(len(c.token_ids) == n for c in out)
        return [c.token_ids for c in out]
    return run, engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=ROOT / "models" / "tiny-qwen3-next")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("-k", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--executor", choices=["local", "cluster"], default="local",
                    help="cluster: a local Ray cluster (run inside a loopback-only network namespace)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from tokenizers import Tokenizer

    heldout = args.model / "training" / "heldout.txt"
    if not heldout.is_file():
        print(f"spec_decode: {heldout} not found (the held-out text scripts/train_tiny_model.py writes)",
              file=sys.stderr)
        return 2
    tok = Tokenizer.from_file(str(args.model / "tokenizer.json"))
    docs = [tok.encode(d).ids for d in heldout.read_text().split("<|endoftext|>\n") if d.strip()]
    pool = [d[:args.prompt_len] for d in docs if len(d) >= args.prompt_len]
    ks = sorted(set(args.k) | {0})
    N = args.new_tokens
    if args.executor == "cluster":
        import ray

        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    print(f"model {args.model}  executor {args.executor}  prompt {args.prompt_len}  new tokens {N}  threads "
          f"{args.threads}  float32  greedy  median of {args.repeats}")
    print(f"{'batch':>5} {'k':>2} {'decode tok/s':>12} {'TPOT ms':>8} {'vs k=0':>7} {'steps':>6} "
          f"{'accepted/drafted':>16}  per-position acceptance")
    for b in args.batch:
        prompts = [pool[i % len(pool)] for i in range(b)]
        times: dict[tuple[int, int], list[float]] = {(k, n): [] for k in ks for n in (N, 1)}
        tokens: dict[int, list] = {}
        stats: dict[int, tuple] = {}
        together = args.executor == "local"
        groups = [ks] if together else [[k] for k in ks]
        for group in groups:
            runs = {k: runner(args.model, prompts, k, args.executor) for k in group}
            for run, _ in runs.values():
                run(2)  # warm-up
            for _ in range(args.repeats):
                for n in (N, 1):
                    for k, (run, engine) in runs.items():
                        before = engine.stats
                        t0 = time.perf_counter()
                        out = run(n)
                        times[k, n].append(time.perf_counter() - t0)
                        if n == N:
                            tokens[k] = out
                            a, p = engine.stats, before
                            stats[k] = (a.num_steps - p.num_steps,
                                        a.spec_decode_num_drafts - p.spec_decode_num_drafts,
                                        a.spec_decode_num_draft_tokens - p.spec_decode_num_draft_tokens,
                                        a.spec_decode_num_accepted_tokens - p.spec_decode_num_accepted_tokens,
                                        [x - y for x, y in zip(a.spec_decode_accepted_per_pos,
                                                               p.spec_decode_accepted_per_pos, strict=True)])
            for _, engine in runs.values():
                engine.executor.shutdown()
        base = None
        for k in ks:
            assert tokens[k] == tokens[0], f"k={k}: greedy tokens differ from k=0 at batch {b}"
            decode_s = max(statistics.median(times[k, N]) - statistics.median(times[k, 1]), 1e-9)
            rate = b * (N - 1) / decode_s
            base = base or rate
            steps, verifies, drafted, accepted, per_pos = stats[k]
            acc = f"{accepted}/{drafted}" if drafted else "-"
            pos = " ".join(f"{a / verifies:.2f}" for a in per_pos) if verifies else "-"
            print(f"{b:>5} {k:>2} {rate:>12.1f} {1000 * decode_s / (N - 1):>8.2f} {rate / base:>6.2f}x "
                  f"{steps:>6} {acc:>16}  {pos}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
