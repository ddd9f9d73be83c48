"""`nextserve` command line: `serve` (the HTTP API on Ray Serve), `generate` (offline batch through
the engine), `rebalance` (expert shards of a running server) and `make-tiny-model`.
Mistakes a user can make end with exit code 2 and one line naming the flag, never a traceback."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from model.config import DTYPES

# The built-in model `generate` uses without --model: trained, shipped in the repository
# (scripts/train_tiny_model.py makes it).
TINY_MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "tiny-qwen3-next"
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "ray_config.yaml"


class UsageError(Exception):
    """A bad flag value found after parsing; printed as one line, exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse prints the usage block too; one line is easier to read and to grep.
        self.exit(2, f"{self.prog}: error: {message}\n")


def _token_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(i < 0 for i in ids):
        raise argparse.ArgumentTypeError(f"token ids must be >= 0, got {text!r}")
    return ids


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="nextserve", description="Serve Qwen3-Next and Qwen3 MoE models.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = sub.add_parser("generate", help="generate from prompts, batched through the engine")
    gen.add_argument("--model", help=f"Hugging Face checkpoint directory (default: {TINY_MODEL_DIR})")
    prompts = gen.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    prompts.add_argument("--prompt-token-ids", action="append", type=_token_ids,
                         help="comma-separated prompt token ids (repeatable)")
    gen.add_argument("--max-tokens", type=int, default=16)
    gen.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0, help="0 or -1: off")
    gen.add_argument("--min-p", type=float, default=0.0, help="0: off")
    gen.add_argument("--presence-penalty", type=float, default=0.0)
    gen.add_argument("--frequency-penalty", type=float, default=0.0)
    gen.add_argument("--repetition-penalty", type=float, default=1.0, help="1: off")
    gen.add_argument("--min-tokens", type=int, default=0, help="no EOS or stop before this many tokens")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--ignore-eos", action="store_true")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt and line")
    gen.add_argument("--executor", choices=["local", "cluster"], default="local",
                     help="local (this process) or cluster (Ray actors)")
    gen.add_argument("--config", help="with --executor cluster: the ray_config.yaml whose placement to use "
                                      f"(default: {DEFAULT_CONFIG})")
    gen.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: the checkpoint's")
    gen.add_argument("--device", default="cpu")
    gen.add_argument("--max-model-len", type=int, default=None)
    gen.add_argument("--max-num-seqs", type=int, default=16)
    gen.add_argument("--max-num-batched-tokens", type=int, default=2048)
    gen.add_argument("--block-size", type=int, default=16, help="tokens per KV-cache block")
    gen.add_argument("--num-kv-blocks", type=int, default=None,
                     help="KV-cache blocks per attention layer (default: every sequence at --max-model-len; "
                          "fewer: sequences are preempted and recomputed when they run out)")
    gen.add_argument("--no-prefix-caching", dest="enable_prefix_caching", action="store_false",
                     help="compute every prompt in full instead of reusing cached prefixes")
    gen.add_argument("--prefix-cache-states", type=int, default=32,
                     help="saved DeltaNet states kept for prefix caching (default: %(default)s)")
    gen.add_argument("--prefix-cache-state-interval", type=int, default=32,
                     help="KV-cache blocks between DeltaNet states saved along a prompt "
                          "(default: %(default)s)")
    gen.add_argument("--speculative-tokens", type=int, default=0,
                     help="MTP speculative decoding: draft tokens per step from the checkpoint's MTP layer "
                          "(0: off)")
    gen.add_argument("--compile", action="store_true",
                     help="decode steps through torch.compile, both executors (the first step of each batch "
                          "size waits for its compile)")
    gen.set_defaults(func=_generate)

    srv = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API on Ray Serve")
    srv.add_argument("--config", help=f"Ray Serve config file (default: {DEFAULT_CONFIG})")
    srv.add_argument("--model", help="checkpoint directory; overrides the file's args.model")
    srv.add_argument("--port", type=int, default=None, help="overrides the file's http_options.port")
    srv.add_argument("--host", default=None, help="overrides the file's http_options.host")
    srv.add_argument("--ingress", choices=["auto", "proxy", "direct"], default=None,
                     help="overrides the file's serve.ingress (default auto): proxy (Ray Serve's HTTP "
                          "proxy), direct (the one engine replica serves --port itself) or auto (direct "
                          "where it can be, else the proxy; see README, Serving)")
    srv.set_defaults(func=_serve)

    reb = sub.add_parser("rebalance", help="ask a serving replica to rebalance its expert shards now")
    reb.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    reb.add_argument("--admin-key", default=None,
                     help="the server's serve.admin_api_key (default: $NEXTSERVE_ADMIN_API_KEY, which "
                          "unlike a flag other users of the machine cannot read from the process list)")
    reb.set_defaults(func=_rebalance)

    tiny = sub.add_parser("make-tiny-model", help="write a tiny random-weight checkpoint")
    tiny.add_argument("dir")
    tiny.add_argument("--arch", choices=["qwen3_next", "qwen3_moe"], default="qwen3_next")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    tiny.set_defaults(func=_make_tiny_model)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        print(f"nextserve {args.command}: error: {e}", file=sys.stderr)
        return 2


def _generate(args: argparse.Namespace) -> int:
    from deployments.engine_factory import build_llm_engine

    limits = _engine_limits(args)  # every flag checked before the checkpoint is read
    params = _sampling_params(args)
    tokenizer, prompts, flag = _prompts(args)  # before loading any weights: they take a while
    limits = limits.model_copy(update={"max_num_seqs": min(len(prompts), limits.max_num_seqs)})
    config = _engine_config(args, limits)
    try:
        engine = build_llm_engine(config, tokenizer)
    except (ValueError, OSError) as e:  # an unreadable checkpoint, a placement that cannot be made
        raise UsageError(str(e)) from None
    try:
        for i, ids in enumerate(prompts):
            if len(ids) > engine.executor.max_model_len:
                raise UsageError(f"{flag}: prompt {i + 1} has {len(ids)} tokens, more than --max-model-len "
                                 f"{engine.executor.max_model_len}")
        results = engine.generate(prompts, params)
    except ValueError as e:  # the engine refused a prompt
        raise UsageError(f"{flag}: {e}") from None
    finally:
        engine.executor.shutdown()
    for r in results:
        if args.json:
            print(json.dumps({"token_ids": list(r.token_ids), "logprobs": list(r.logprobs or ())}))
        else:
            print(r.text if r.text is not None else " ".join(map(str, r.token_ids)))
    return 0


def _engine_limits(args: argparse.Namespace):
    """The engine's flags, checked by the same settings class as ray_config.yaml's `engine`."""
    from pydantic import ValidationError

    from engine.config import EngineLimits

    try:
        return EngineLimits(max_num_seqs=args.max_num_seqs, max_model_len=args.max_model_len,
                            max_num_batched_tokens=args.max_num_batched_tokens, block_size=args.block_size,
                            num_kv_blocks=args.num_kv_blocks, compile=args.compile,
                            enable_prefix_caching=args.enable_prefix_caching,
                            prefix_cache_states=args.prefix_cache_states,
                            prefix_cache_state_interval=args.prefix_cache_state_interval,
                            speculative_tokens=args.speculative_tokens)
    except ValidationError as e:
        first = e.errors()[0]
        flag = "--" + str(first["loc"][0]).replace("_", "-")
        raise UsageError(f"{flag}: {first['msg']} (got {first.get('input')!r})") from None


def _engine_config(args: argparse.Namespace, limits):
    """The flags as a NextserveConfig (with --executor cluster: over the --config file's args, whose
    pools, placement and cluster settings the cluster executor reads)."""
    from deployments.config import NextserveConfig
    from engine.config import NextserveConfigError

    if args.executor == "cluster":
        try:
            base = NextserveConfig.from_yaml(args.config or DEFAULT_CONFIG)
        except NextserveConfigError as e:
            raise UsageError(f"--config: {e}") from None
    elif args.config is not None:
        raise UsageError("--config: only the cluster executor reads a placement (add --executor cluster)")
    else:
        base = NextserveConfig()
    return base.model_copy(update=dict(model=args.model, dtype=args.dtype, executor=args.executor,
                                       device=args.device, engine=limits))


def _serve(args: argparse.Namespace) -> int:
    from deployments.serve_command import ServeUsageError, serve_forever

    if args.port is not None and not 0 < args.port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {args.port}")
    if args.model is not None and not (Path(args.model) / "config.json").is_file():
        raise UsageError(f"--model: {args.model} has no config.json")
    try:
        return serve_forever(args.config, args.model, args.port, args.host, args.ingress)
    except ServeUsageError as e:
        raise UsageError(str(e)) from None


def _rebalance(args: argparse.Namespace) -> int:
    """POST /rebalance: the replica Serve routes it to rebalances at its next step (each replica
    balances its own shards from its own load; the automatic policy covers them all)."""
    import os

    import requests

    key = args.admin_key or os.environ.get("NEXTSERVE_ADMIN_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        reply = requests.post(f"{args.url.rstrip('/')}/rebalance", headers=headers, timeout=30)
    except requests.RequestException as e:
        raise UsageError(f"--url: cannot reach {args.url} ({type(e).__name__})") from None
    try:
        print(json.dumps(reply.json(), indent=2))
    except ValueError:
        print(f"HTTP {reply.status_code}: {reply.text[:200]}")
    return 0 if reply.ok else 1


def _sampling_params(args: argparse.Namespace):
    from engine.sampling import SamplingParams, SamplingParamsError

    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, min_p=args.min_p, presence_penalty=args.presence_penalty,
                              frequency_penalty=args.frequency_penalty,
                              repetition_penalty=args.repetition_penalty, min_tokens=args.min_tokens,
                              seed=args.seed, ignore_eos=args.ignore_eos, logprobs=True)
    except SamplingParamsError as e:
        raise UsageError(f"--{e.field.replace('_', '-')}: {e}") from None


def _prompts(args: argparse.Namespace):
    """(tokenizer or None, prompt token ids, the flag they came from), checked against the config."""
    from engine.tokenizer import Tokenizer, token_id_limit
    from model.config import ConfigError, ModelConfig

    if args.model is None:
        args.model = str(_builtin_tiny_model())
    try:
        config = ModelConfig.from_dir(args.model)
    except ConfigError as e:
        raise UsageError(f"--model: {e}") from None  # e names the directory
    tokenizer = Tokenizer.from_dir(args.model)
    if args.prompt is not None:
        if tokenizer is None:
            raise UsageError(f"--prompt needs {args.model}/tokenizer.json; give --prompt-token-ids instead")
        flag, prompts = "--prompt", [tokenizer.encode(p) for p in args.prompt]
        if any(not p for p in prompts):
            raise UsageError("--prompt: a prompt encodes to no tokens")
    else:
        flag, prompts = "--prompt-token-ids", args.prompt_token_ids
    limit = token_id_limit(tokenizer, config.vocab_size)  # the server's rule too
    for ids in prompts:
        bad = [t for t in ids if t >= limit]
        if bad:
            raise UsageError(f"{flag}: token id {bad[0]} is out of range: valid ids are below {limit} "
                             f"(max of the tokenizer's size and vocab_size {config.vocab_size})")
    return tokenizer, prompts, flag


def _builtin_tiny_model() -> Path:
    if not (TINY_MODEL_DIR / "config.json").is_file():
        raise UsageError(f"--model: the built-in model {TINY_MODEL_DIR} is missing (it ships with the "
                         f"repository: `git checkout -- models/tiny-qwen3-next`, or retrain it with "
                         f"scripts/train_tiny_model.py)")
    return TINY_MODEL_DIR


def _make_tiny_model(args: argparse.Namespace) -> int:
    from model.tiny import make_tiny_model

    print(make_tiny_model(args.dir, arch=args.arch, seed=args.seed, dtype=args.dtype))
    return 0


if __name__ == "__main__":
    sys.exit(main())
