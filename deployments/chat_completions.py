"""POST /v1/chat/completions: messages through the checkpoint's chat template, `n` choices,
streaming or not, with per-token logprobs and vLLM's `return_token_ids`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from deployments.chat import RESERVED_TEMPLATE_VARIABLES, ChatTemplateError, render_chat
from deployments.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatMessage,
    ChatResponseMessage,
    ChatTokenLogprob,
    TopLogprob,
    Usage,
)
from deployments.serving import SSE_DONE, APIError, Choice, ServingContext, new_id, run_choices, sse
from engine.llm_engine import TopLogprobs
from engine.sampling import SamplingParams


def render_prompt(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool,
                  chat_template_kwargs: dict[str, Any] | None, add_special_tokens: bool = False) -> list[int]:
    """The messages through the checkpoint's chat template, as token ids (also what /tokenize
    returns for them). Renders and tokenizes: run it off the event loop."""
    tok = ctx.tokenizer
    if not tok.chat_template:
        raise APIError(400, f"the model `{ctx.model_name}` has no chat template; use /v1/completions",
                       param="messages")
    kwargs = chat_template_kwargs or {}
    reserved = next((k for k in kwargs if k in RESERVED_TEMPLATE_VARIABLES), None)
    if reserved is not None:
        raise APIError(400, f"chat_template_kwargs: {reserved!r} is set by the server, not by a request",
                       param="chat_template_kwargs")
    try:
        text = render_chat(tok.chat_template, [m.for_template() for m in messages], add_generation_prompt,
                           {"bos_token": tok.bos_token, "eos_token": tok.eos_token}, **kwargs)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    return ctx.encode(text, "messages", add_special_tokens=add_special_tokens)  # the template writes them


def prepare(ctx: ServingContext, req: ChatCompletionRequest) -> tuple[list[Choice], list[SamplingParams]]:
    """The request's n choices (each an engine request of its own) and their sampling params."""
    ctx.check_model(req.model)
    ctx.check_choices(1, req.n)
    ids = render_prompt(ctx, req.messages, req.add_generation_prompt, req.chat_template_kwargs)
    if not ids:
        raise APIError(400, "messages render to an empty prompt", param="messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = [ctx.sampling_params(req, len(ids), max_tokens, choice=i, logprobs=req.logprobs,
                                  top_logprobs=req.top_logprobs if req.logprobs else 0) for i in range(req.n)]
    return [Choice(i, ids) for i in range(req.n)], params


async def complete(ctx: ServingContext, req: ChatCompletionRequest) -> ChatCompletionResponse:
    choices, params = await asyncio.to_thread(prepare, ctx, req)
    request_id = new_id("chatcmpl")
    async with aclosing(run_choices(ctx, request_id, choices, params)) as outs:
        async for _ in outs:
            pass
    out = []
    for c in choices:
        lp = _logprobs(ctx, c.token_ids, c.logprobs, c.top_logprobs) if req.logprobs else None
        out.append(ChatChoice(index=c.index, message=ChatResponseMessage(role="assistant", content=c.text),
                              logprobs=lp, finish_reason=c.finish_reason,
                              token_ids=c.token_ids if req.return_token_ids else None))
    return ChatCompletionResponse(
        id=request_id, created=int(time.time()), model=ctx.model_name, choices=out, usage=_usage(choices),
        prompt_token_ids=choices[0].prompt_token_ids if req.return_token_ids else None)


async def stream(ctx: ServingContext, req: ChatCompletionRequest) -> AsyncIterator[str]:
    choices, params = await asyncio.to_thread(prepare, ctx, req)
    request_id, created = new_id("chatcmpl"), int(time.time())

    def chunk(c: ChatChunkChoice | None, **kw) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name,
                                       choices=[c] if c else [], **kw))

    first = True
    async with aclosing(run_choices(ctx, request_id, choices, params)) as outs:
        async for choice, out in outs:
            if first:  # OpenAI opens each choice with the role; vLLM adds the prompt's ids there
                first = False
                for c in choices:
                    yield chunk(ChatChunkChoice(index=c.index,
                                                delta=ChatResponseMessage(role="assistant", content="")),
                                prompt_token_ids=c.prompt_token_ids if req.return_token_ids else None)
            lp = None
            if req.logprobs:
                lp = _logprobs(ctx, list(out.new_token_ids), list(out.new_logprobs or ()),
                               list(out.new_top_logprobs or ()))
            yield chunk(ChatChunkChoice(
                index=choice.index, delta=ChatResponseMessage(content=out.new_text), logprobs=lp,
                finish_reason=choice.finish_reason if out.finished else None,
                token_ids=list(out.new_token_ids) if req.return_token_ids else None))
    if req.stream_options is None or req.stream_options.include_usage:
        yield chunk(None, usage=_usage(choices))
    yield SSE_DONE


def _usage(choices: list[Choice]) -> Usage:
    """The prompt once, as OpenAI and vLLM count it; every choice's output."""
    p, n = len(choices[0].prompt_token_ids), sum(len(c.token_ids) for c in choices)
    return Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n)


def _logprobs(ctx: ServingContext, token_ids: list[int], logprobs: list[float],
              tops: list[TopLogprobs]) -> ChatLogprobs:
    def entry(t: int, lp: float) -> TopLogprob:
        text = ctx.token_text(t)
        return TopLogprob(token=text, logprob=lp, bytes=list(text.encode()))

    content = []
    for t, lp, top in zip(token_ids, logprobs, tops or [()] * len(token_ids), strict=True):
        e = entry(t, lp)
        content.append(ChatTokenLogprob(token=e.token, logprob=e.logprob, bytes=e.bytes,
                                        top_logprobs=[entry(i, v) for i, v in top]))
    return ChatLogprobs(content=content)
