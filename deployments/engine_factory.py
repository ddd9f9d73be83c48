"""The one place that builds an engine from NextserveConfig: the executor (local or cluster,
imported only when chosen: the cluster one brings Ray), the LLMEngine around it with the expert
rebalancing policy, and for serving the asyncio face that the HTTP routes stream from: the
engine loop in a thread, or in an engine core process (engine.engine_process). The
CLI's `generate` and the Serve app both build through here."""

from __future__ import annotations

import functools
from pathlib import Path

from deployments.config import NextserveConfig
from engine.async_engine import AsyncLLMEngine
from engine.config import NextserveConfigError
from engine.core_client import EngineCoreClient
from engine.executor import Executor
from engine.llm_engine import LLMEngine
from engine.tokenizer import Tokenizer


def build_executor(config: NextserveConfig) -> Executor:
    """The executor `config.executor` names, with the engine's cache sizes."""
    if config.model is None:
        raise NextserveConfigError("model: no checkpoint directory given")
    limits = config.engine
    sizes = dict(model_dir=config.model, dtype=config.dtype, num_slots=limits.max_num_seqs,
                 max_model_len=limits.max_model_len, block_size=limits.block_size,
                 num_kv_blocks=limits.num_kv_blocks,
                 num_state_snapshots=limits.prefix_cache_states if limits.enable_prefix_caching else 0)
    if config.executor == "cluster":
        from cluster.executor import ClusterExecutor

        try:
            return ClusterExecutor(config=config, speculative_tokens=limits.speculative_tokens,
                                   compile=limits.compile, **sizes)
        except ValueError as e:
            if limits.speculative_tokens and "engine.speculative_tokens" in str(e):
                raise NextserveConfigError(str(e)) from None
            raise
    from engine.local_executor import LocalExecutor

    try:
        return LocalExecutor(device=config.device, compile=config.engine.compile,
                             speculative_tokens=limits.speculative_tokens, **sizes)
    except ValueError as e:
        if limits.speculative_tokens and "engine.speculative_tokens" in str(e):
            raise NextserveConfigError(str(e)) from None
        raise


def build_llm_engine(config: NextserveConfig, tokenizer: Tokenizer | None,
                     compile_in_background: bool = False) -> LLMEngine:
    """Executor and engine; the executor is shut down again if the engine cannot be built.
    `compile_in_background` (serving): with engine.compile, the decode buckets compile in a
    thread while steps run eagerly, each bucket switching to its graph once compiled; without
    it (`generate`), a bucket compiles on its first step."""
    executor = build_executor(config)
    try:
        decode = getattr(executor, "decode", None)
        if compile_in_background and decode is not None:
            decode.compile_in_background()
        # Every slot must be able to decode in each step, so the budget is at least the slot count.
        budget = max(config.engine.max_num_batched_tokens, executor.num_slots)
        limits = config.engine
        engine = LLMEngine(executor, tokenizer=tokenizer, max_num_batched_tokens=budget,
                           enable_prefix_caching=limits.enable_prefix_caching,
                           prefix_cache_state_interval=limits.prefix_cache_state_interval)
        if config.executor == "cluster" and executor.config.num_experts > 0:
            from cluster.rebalance import RebalancePolicy

            # A step hook: it rebalances in the engine thread, between two steps.
            engine.step_hooks.append(RebalancePolicy(executor, config.rebalance))
        return engine
    except BaseException:
        executor.shutdown()
        raise


def build_engine(config: NextserveConfig) -> tuple[AsyncLLMEngine | EngineCoreClient, Tokenizer, int]:
    """A serving replica's engine: (async engine, tokenizer, the context length it serves). The
    engine loop runs where `engine.engine_process` says: a thread here, or a core process."""
    if config.model is None:
        raise NextserveConfigError("model: no checkpoint directory given")
    if not Path(config.model).is_dir():
        raise NextserveConfigError(f"model: {config.model} is not a directory (expected a Hugging Face "
                                   f"checkpoint: config.json, *.safetensors, tokenizer.json)")
    tokenizer = Tokenizer.from_dir(config.model)
    if tokenizer is None:  # an HTTP API takes text; token-id-only checkpoints suit `generate`
        raise NextserveConfigError(f"model: {config.model} has no tokenizer.json, which serving needs")
    serve = config.serve
    process = config.engine.engine_process
    if process == "separate" and config.executor == "cluster":
        # The core would have to join this replica's Ray cluster from a child process; the
        # cluster executor's compute runs in its actors anyway.
        raise NextserveConfigError("engine.engine_process: separate runs only with executor: local; use "
                                   "auto or inline with the cluster executor")
    if process == "separate" or (process == "auto" and config.executor == "local"):
        core = EngineCoreClient(functools.partial(build_core_engine, config), serve.max_queued_requests,
                                serve.retry_after_s, serve.request_timeout_s)
        return core, tokenizer, core.max_seq_len
    _set_torch_threads(config)
    engine = build_llm_engine(config, tokenizer, compile_in_background=True)
    try:
        async_engine = AsyncLLMEngine(engine, serve.max_queued_requests, serve.retry_after_s,
                                      serve.request_timeout_s)
        return async_engine, tokenizer, engine.scheduler.max_seq_len
    except BaseException:
        engine.executor.shutdown()
        raise


def build_core_engine(config: NextserveConfig) -> LLMEngine:
    """The LLMEngine of an engine core process (engine/core.py calls it there): it detokenizes
    and checks stop strings itself, so it loads the tokenizer too."""
    _set_torch_threads(config)
    return build_llm_engine(config, Tokenizer.from_dir(config.model), compile_in_background=True)


def _set_torch_threads(config: NextserveConfig) -> None:
    if config.serve.torch_threads is not None:
        import torch

        torch.set_num_threads(config.serve.torch_threads)
