"""Prefix caching through the engine (LLMEngine over the local executor, float32 tiny Qwen3-Next):
time to first token and prefill tokens computed, cache on vs off, on two workloads:
- chat: 8 conversations x 6 turns; each turn's prompt is a shared system prompt, the conversation
  so far (its earlier prompts and outputs) and a new user message; the conversations take turns,
  one request at a time, so a turn's TTFT is its own prefill;
- system: requests that share a long system prompt and differ in their question.
Runs alternate off / on (a fresh engine each, so each on-run starts with an empty cache) and the
table gives medians over --repeats runs of each.

    python -m bench.prefix_cache [--repeats 2] [--threads 1] [--model DIR]"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

OUTPUT_TOKENS = 32
BLOCK_SIZE = 16


@dataclass
class Run:
    ttfts: list[float]
    prompt_tokens: int  # looked up / sent
    computed: int  # prefill tokens the engine computed
    hit: int  # prompt tokens served from the cache


def percentile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def one_request(engine, request_id: str, prompt: list[int], params) -> tuple[float, list[int]]:
    """(seconds to the first output token, output tokens): the engine runs this request alone."""
    t0 = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    ttft, out = None, []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
            if ttft is None and o.new_token_ids:
                ttft = time.perf_counter() - t0
    return ttft, out


def chat_workload(rng: random.Random, vocab: int) -> tuple[list[int], list[list[list[int]]]]:
    """A 200-token system prompt and 8 conversations' 6 user messages of 40-80 tokens."""
    system = [rng.randrange(3, vocab) for _ in range(200)]
    return system, [[[rng.randrange(3, vocab) for _ in range(rng.randrange(40, 81))] for _ in range(6)]
                    for _ in range(8)]


def run_chat(engine, params, system: list[int], convs: list[list[list[int]]]) -> Run:
    histories = [list(system) for _ in convs]
    ttfts, sent = [], 0
    before = engine.stats
    for turn in range(len(convs[0])):
        for c, (history, messages) in enumerate(zip(histories, convs, strict=True)):
            history += messages[turn]
            ttft, out = one_request(engine, f"chat-{c}-{turn}", history, params)
            ttfts.append(ttft)
            sent += len(history)
            history += out
    return _run(engine, before, ttfts, sent)


def run_system(engine, params, system: list[int], questions: list[list[int]]) -> Run:
    before = engine.stats
    ttfts, sent = [], 0
    for i, q in enumerate(questions):
        ttft, _ = one_request(engine, f"sys-{i}", system + q, params)
        ttfts.append(ttft)
        sent += len(system) + len(q)
    return _run(engine, before, ttfts, sent)


def _run(engine, before, ttfts: list[float], sent: int) -> Run:
    after = engine.stats
    return Run(ttfts, sent, after.num_prompt_tokens - before.num_prompt_tokens,
               after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="checkpoint (default: the tiny Qwen3-Next, made in a temp dir)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each of off / on, alternating")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--system-tokens", type=int, default=1100, help="system workload's shared prompt")
    parser.add_argument("--system-requests", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from engine.llm_engine import LLMEngine
    from engine.local_executor import LocalExecutor
    from engine.sampling import SamplingParams
    from model.tiny import make_tiny_model

    tmp = tempfile.TemporaryDirectory()
    model = Path(args.model) if args.model else make_tiny_model(Path(tmp.name) / "tiny", dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    rng = random.Random(0)
    vocab = 380
    system, convs = chat_workload(rng, vocab)
    long_system = [rng.randrange(3, vocab) for _ in range(args.system_tokens)]
    questions = [[rng.randrange(3, vocab) for _ in range(rng.randrange(30, 61))]
                 for _ in range(args.system_requests)]

    def engine(cache: bool) -> LLMEngine:
        ex = LocalExecutor(model, dtype="float32", num_slots=4, max_model_len=2048, block_size=BLOCK_SIZE)
        return LLMEngine(ex, enable_prefix_caching=cache)

    results: dict[tuple[str, bool], list[Run]] = {}
    for _ in range(args.repeats):
        for cache in (False, True):
            results.setdefault(("chat", cache), []).append(run_chat(engine(cache), params, system, convs))
            results.setdefault(("system", cache), []).append(
                run_system(engine(cache), params, long_system, questions))

    print(f"model {model}, float32, {torch.get_num_threads()} thread(s), block_size {BLOCK_SIZE}, "
          f"{OUTPUT_TOKENS} output tokens per request, medians of {args.repeats} runs each")
    print(f"{'workload':<8} {'cache':<5} {'requests':>8} {'prompt tok':>10} {'computed':>9} "
          f"{'from cache':>10} {'TTFT p50':>9} {'TTFT p99':>9} {'p50 on/off':>10}")
    for workload in ("chat", "system"):
        p50_off = statistics.median(percentile(r.ttfts, 0.5) for r in results[workload, False])
        for cache in (False, True):
            runs = results[workload, cache]
            p50 = statistics.median(percentile(r.ttfts, 0.5) for r in runs)
            p99 = statistics.median(percentile(r.ttfts, 0.99) for r in runs)
            r = runs[-1]  # token counts are the same every run
            print(f"{workload:<8} {'on' if cache else 'off':<5} {len(r.ttfts):>8} {r.prompt_tokens:>10} "
                  f"{r.computed:>9} {100 * r.hit / r.prompt_tokens:>9.1f}% {1000 * p50:>7.1f}ms "
                  f"{1000 * p99:>7.1f}ms {p50 / p50_off:>10.2f}")


if __name__ == "__main__":
    main()
