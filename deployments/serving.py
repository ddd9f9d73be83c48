"""What the completion and chat routes share: the serving context (engine, tokenizer, limits),
request → SamplingParams, one choice's accumulated output, server-sent events, API errors."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

from pydantic import BaseModel

from deployments.config import NextserveConfig
from engine.llm_engine import EngineStats, RequestOutput, TopLogprobs
from engine.sampling import SamplingParams, SamplingParamsError
from engine.tokenizer import Tokenizer, token_id_limit


class APIError(Exception):
    """An error the client caused or must wait out; becomes OpenAI's JSON error form."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.retry_after_s = status, message, param, retry_after_s


class Engine(Protocol):
    """What the routes need of an engine: engine/async_engine.AsyncLLMEngine, or a test's fake."""

    def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                 params: SamplingParams) -> AsyncIterator[RequestOutput]: ...

    def stats(self) -> EngineStats: ...


MIN_TEMPERATURE = 1e-2  # as vLLM: a smaller one overflows the scaled logits to inf


@dataclass(eq=False)  # hashed by identity, for token_text's cache
class ServingContext:
    engine: Engine
    tokenizer: Tokenizer
    model_name: str
    max_model_len: int
    vocab_size: int  # the model's: rows of its logits
    max_prompts: int = 64  # prompts in one completion request (serve.max_prompts_per_request)
    reasoning_parser: str = "none"  # serve.reasoning_parser
    tool_call_parser: str = "none"  # serve.tool_call_parser

    @property
    def token_id_limit(self) -> int:
        return token_id_limit(self.tokenizer, self.vocab_size)

    def check_model(self, model: str) -> None:
        if model != self.model_name:
            raise APIError(404, f"The model `{model}` does not exist; this server serves "
                                f"`{self.model_name}`.", param="model")

    def check_token_ids(self, ids: Sequence[int], prompt_index: int) -> None:
        """Token-id prompts must name ids the model has; caught here, before anything (the
        tokenizer's decode included) sees them."""
        limit = self.token_id_limit
        bad = next((t for t in ids if not 0 <= t < limit), None)
        if bad is not None:
            raise APIError(400, f"prompt {prompt_index}: token id {bad} is out of vocabulary "
                                f"(0..{limit - 1})", param="prompt")

    def encode(self, text: str, where: str, add_special_tokens: bool = True) -> list[int]:
        """Text that could never fit in the context is refused without tokenizing it: no token
        covers more than `max_token_chars` characters (twice that, for normalizers that fold
        characters together)."""
        most = 2 * self.max_model_len * max(self.tokenizer.max_token_chars, 1)
        if len(text) > most:
            raise APIError(400, f"{where}: {len(text)} characters cannot fit in this model's maximum context "
                                f"length of {self.max_model_len} tokens", param=where.split("[")[0])
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def check_choices(self, num_prompts: int, n: int) -> None:
        """Each of the n choices of each prompt is an engine request of its own: together they
        must fit what a replica admits (never 429: retrying cannot help)."""
        if num_prompts * n > self.max_prompts:
            what = f"n={n} choices for each of {num_prompts} prompts" if num_prompts > 1 else f"n={n} choices"
            raise APIError(400, f"{what} in one request; this server takes at most {self.max_prompts} "
                                f"(serve.max_prompts_per_request)", param="n" if n > 1 else "prompt")

    def sampling_params(self, req: Any, prompt_len: int, max_tokens: int | None, choice: int = 0,
                        **extra: Any) -> SamplingParams:
        """The request's sampling fields for its `choice`-th choice of a prompt; `max_tokens` None
        means all the room the context leaves. Every value that reaches the engine's shared
        tensors is bounded here."""
        room = self.max_model_len - prompt_len
        if room < 0 or (room == 0 and max_tokens != 0):
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; the "
                                f"prompt has {prompt_len} tokens.", param="prompt")
        max_tokens = room if max_tokens is None else max_tokens
        if prompt_len + max_tokens > self.max_model_len:
            raise APIError(400, f"This model's maximum context length is {self.max_model_len} tokens; "
                                f"you requested {prompt_len + max_tokens} tokens ({prompt_len} in the "
                                f"prompt, {max_tokens} in the completion).", param="max_tokens")
        stop_ids = tuple(req.stop_token_ids or ())
        bad = next((t for t in stop_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"stop_token_ids: {bad} is out of vocabulary (0..{self.vocab_size - 1})",
                           param="stop_token_ids")
        bias = req.logit_bias_ids
        bad = next((t for t in bias if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise APIError(400, f"logit_bias: token id {bad} is out of vocabulary (0..{self.vocab_size - 1})",
                           param="logit_bias")
        top_k = 0 if req.top_k >= self.vocab_size else req.top_k  # every token: the same as off
        temperature = req.temperature if req.temperature == 0 else max(req.temperature, MIN_TEMPERATURE)
        try:
            return SamplingParams(max_tokens=max(max_tokens, 1), temperature=temperature, top_p=req.top_p,
                                  top_k=top_k, min_p=req.min_p, seed=choice_seed(req.seed, choice),
                                  presence_penalty=req.presence_penalty,
                                  frequency_penalty=req.frequency_penalty,
                                  repetition_penalty=req.repetition_penalty, logit_bias=bias,
                                  min_tokens=req.min_tokens, stop=req.stop_strings, stop_token_ids=stop_ids,
                                  ignore_eos=req.ignore_eos, **extra)
        except SamplingParamsError as e:
            raise APIError(400, str(e), param=e.field) from None

    @lru_cache(maxsize=65536)  # noqa: B019 - one context per replica, lives as long as it
    def token_text(self, token_id: int) -> str:
        """One token as text, special tokens included (what logprobs name tokens by)."""
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def top_dict(self, top: TopLogprobs) -> dict[str, float]:
        return {self.token_text(t): lp for t, lp in top}


def choice_seed(seed: int | None, choice: int) -> int | None:
    """The seed of a prompt's `choice`-th choice: seed + choice, as vLLM seeds n > 1 children,
    so the choices differ and a request repeated gets the same ones. Wraps within the 64 bits
    a torch.Generator takes."""
    if seed is None:
        return None
    s = seed + choice
    return s - 2**64 if s >= 2**64 else s


def served_model_name(config: NextserveConfig) -> str:
    return config.serve.served_model_name or Path(config.model or "tiny-qwen3-next").name


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


@dataclass
class Choice:
    """One prompt's output so far; `take()` returns what arrived since the last call."""

    index: int
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[TopLogprobs] = field(default_factory=list)
    prompt_logprobs: tuple[float | None, ...] | None = None
    prompt_top_logprobs: tuple[TopLogprobs, ...] | None = None
    finish_reason: str | None = None
    drop_output: bool = False  # max_tokens=0 with echo: the one sampled token is not shown
    num_cached_tokens: int | None = None  # of the prompt, from the prefix cache; set by the first output

    def add(self, out: RequestOutput) -> RequestOutput:
        if self.num_cached_tokens is None:  # a request preempted later may resume from more
            self.num_cached_tokens = out.num_cached_tokens
        if out.prompt_logprobs is not None:
            self.prompt_logprobs, self.prompt_top_logprobs = out.prompt_logprobs, out.prompt_top_logprobs
        if out.finished:
            self.finish_reason = "length" if self.drop_output else out.finish_reason
        if self.drop_output:
            return RequestOutput(out.request_id, (), None, out.finished, self.finish_reason,
                                 out.num_prompt_tokens, 0)
        self.token_ids += out.new_token_ids
        self.text += out.new_text
        if out.new_logprobs is not None:
            self.logprobs += out.new_logprobs
            self.top_logprobs += out.new_top_logprobs or [()] * len(out.new_logprobs)
        return out


async def run_choices(ctx: ServingContext, request_id: str, choices: list[Choice],
                      params: list[SamplingParams]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
    """Run every choice's request at once; (choice, its output) in arrival order. Leaving early
    (close this generator) cancels all of them, which aborts them in the engine at once."""
    if len(choices) == 1:  # the common case: no tasks, no merge queue
        async with aclosing(_generate(ctx, f"{request_id}-0", choices[0], params[0])) as outs:
            async for out in outs:
                yield choices[0], choices[0].add(out)
        return
    merged: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice, p: SamplingParams) -> None:
        try:
            async with aclosing(_generate(ctx, f"{request_id}-{choice.index}", choice, p)) as outs:
                async for out in outs:
                    await merged.put((choice, out))
        except Exception as e:
            await merged.put(e)

    tasks = [asyncio.create_task(pump(c, p)) for c, p in zip(choices, params, strict=True)]
    try:
        done = 0
        while done < len(choices):
            item = await merged.get()
            if isinstance(item, Exception):
                raise item
            choice, out = item
            done += out.finished
            yield choice, choice.add(out)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _generate(ctx: ServingContext, request_id: str, choice: Choice,
                    params: SamplingParams) -> AsyncIterator[RequestOutput]:
    """The engine's outputs; a ValueError before the first one is the engine refusing the prompt
    (its message is ours, written for the client), later ones are our bugs."""
    started = False
    try:
        async with aclosing(ctx.engine.generate(request_id, choice.prompt_token_ids, params)) as outs:
            async for out in outs:
                started = True
                yield out
    except ValueError as e:
        if started:
            raise
        raise APIError(400, f"prompt {choice.index}: {e}", param="prompt") from None


def sse(payload: BaseModel | dict) -> str:
    body = payload.model_dump_json() if isinstance(payload, BaseModel) else json.dumps(payload)
    return f"data: {body}\n\n"


SSE_DONE = "data: [DONE]\n\n"
