"""Build one replica's engine from NextserveConfig: executor (local or cluster), LLMEngine, and
the asyncio wrapper that the HTTP routes stream from."""

from __future__ import annotations

from pathlib import Path

from engine.async_engine import AsyncLLMEngine
from engine.config import NextserveConfig, NextserveConfigError
from engine.executor import create_executor
from engine.llm_engine import LLMEngine
from engine.tokenizer import Tokenizer


def build_engine(config: NextserveConfig) -> tuple[AsyncLLMEngine, Tokenizer, int]:
    if config.model is None:
        raise NextserveConfigError("model: no checkpoint directory given")
    if not Path(config.model).is_dir():
        raise NextserveConfigError(f"model: {config.model} is not a directory (expected a Hugging Face "
                                   f"checkpoint: config.json, *.safetensors, tokenizer.json)")
    if config.serve.torch_threads is not None:
        import torch

        torch.set_num_threads(config.serve.torch_threads)
    tokenizer = Tokenizer.from_dir(config.model)
    if tokenizer is None:  # an HTTP API takes text; token-id-only checkpoints suit `generate`
        raise NextserveConfigError(f"model: {config.model} has no tokenizer.json, which serving needs")
    limits = config.engine
    kwargs = dict(model_dir=config.model, dtype=config.dtype, num_slots=limits.max_num_seqs,
                  max_model_len=limits.max_model_len, block_size=limits.block_size,
                  num_kv_blocks=limits.num_kv_blocks)
    if config.executor == "cluster":
        import cluster.executor  # noqa: F401 - registers "cluster"; imports Ray, so only on demand

        kwargs["config"] = config  # its actors compute where their pools say
    else:
        kwargs["device"] = config.device
    executor = create_executor(config.executor, **kwargs)
    try:
        # Every slot must be able to decode in each step, so the budget is at least the slot count.
        engine = LLMEngine(executor, tokenizer=tokenizer,
                           max_num_batched_tokens=max(limits.max_num_batched_tokens, executor.num_slots))
        if config.executor == "cluster" and executor.config.num_experts > 0:
            from cluster.rebalance import RebalancePolicy

            # A step hook: it rebalances in the engine thread, between two steps.
            engine.step_hooks.append(RebalancePolicy(executor, config.rebalance))
        return (AsyncLLMEngine(engine, config.serve.max_queued_requests, config.serve.retry_after_s,
                               config.serve.request_timeout_s),
                tokenizer, engine.scheduler.max_seq_len)
    except BaseException:
        executor.shutdown()
        raise
