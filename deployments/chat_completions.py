"""POST /v1/chat/completions: messages through the checkpoint's chat template, streaming or not,
with per-token logprobs and vLLM's `return_token_ids`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from deployments.chat import RESERVED_TEMPLATE_VARIABLES, ChatTemplateError, render_chat
from deployments.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    TopLogprob,
    Usage,
)
from deployments.serving import SSE_DONE, APIError, Choice, ServingContext, new_id, run_choices, sse
from deployments.structured_outputs import structured_outputs_params
from engine.llm_engine import TopLogprobs
from engine.sampling import SamplingParams


def prepare(ctx: ServingContext, req: ChatCompletionRequest) -> tuple[Choice, SamplingParams]:
    """Renders and tokenizes: run it off the event loop (`asyncio.to_thread`)."""
    ctx.check_model(req.model)
    tok = ctx.tokenizer
    if not tok.chat_template:
        raise APIError(400, f"the model `{ctx.model_name}` has no chat template; use /v1/completions",
                       param="messages")
    kwargs = req.chat_template_kwargs or {}
    reserved = next((k for k in kwargs if k in RESERVED_TEMPLATE_VARIABLES), None)
    if reserved is not None:
        raise APIError(400, f"chat_template_kwargs: {reserved!r} is set by the server, not by a request",
                       param="chat_template_kwargs")
    messages = [m.for_template() for m in req.messages]
    try:
        text = render_chat(tok.chat_template, messages, req.add_generation_prompt,
                           {"bos_token": tok.bos_token, "eos_token": tok.eos_token}, **kwargs)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    ids = ctx.encode(text, "messages", add_special_tokens=False)  # the template writes them
    if not ids:
        raise APIError(400, "messages render to an empty prompt", param="messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    params = ctx.sampling_params(req, len(ids), max_tokens, logprobs=req.logprobs,
                                 top_logprobs=req.top_logprobs if req.logprobs else 0,
                                 structured_outputs=structured_outputs_params(req))
    return Choice(0, ids), params


async def complete(ctx: ServingContext, req: ChatCompletionRequest) -> ChatCompletionResponse:
    choice, params = await asyncio.to_thread(prepare, ctx, req)
    request_id = new_id("chatcmpl")
    async with aclosing(run_choices(ctx, request_id, [choice], [params])) as outs:
        async for _ in outs:
            pass
    lp = _logprobs(ctx, choice.token_ids, choice.logprobs, choice.top_logprobs) if req.logprobs else None
    p, n = len(choice.prompt_token_ids), len(choice.token_ids)
    return ChatCompletionResponse(
        id=request_id, created=int(time.time()), model=ctx.model_name,
        choices=[ChatChoice(index=0, message=ChatResponseMessage(role="assistant", content=choice.text),
                            logprobs=lp, finish_reason=choice.finish_reason,
                            token_ids=choice.token_ids if req.return_token_ids else None)],
        usage=Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n),
        prompt_token_ids=choice.prompt_token_ids if req.return_token_ids else None)


async def stream(ctx: ServingContext, req: ChatCompletionRequest) -> AsyncIterator[str]:
    choice, params = await asyncio.to_thread(prepare, ctx, req)
    request_id, created = new_id("chatcmpl"), int(time.time())

    def chunk(c: ChatChunkChoice | None, **kw) -> str:
        return sse(ChatCompletionChunk(id=request_id, created=created, model=ctx.model_name,
                                       choices=[c] if c else [], **kw))

    first = True
    async with aclosing(run_choices(ctx, request_id, [choice], [params])) as outs:
        async for _, out in outs:
            if first:  # OpenAI opens with the role; vLLM adds the prompt's ids there
                first = False
                yield chunk(ChatChunkChoice(index=0, delta=ChatResponseMessage(role="assistant", content="")),
                            prompt_token_ids=choice.prompt_token_ids if req.return_token_ids else None)
            lp = None
            if req.logprobs:
                lp = _logprobs(ctx, list(out.new_token_ids), list(out.new_logprobs or ()),
                               list(out.new_top_logprobs or ()))
            yield chunk(ChatChunkChoice(
                index=0, delta=ChatResponseMessage(content=out.new_text), logprobs=lp,
                finish_reason=choice.finish_reason if out.finished else None,
                token_ids=list(out.new_token_ids) if req.return_token_ids else None))
    if req.stream_options is None or req.stream_options.include_usage:
        p, n = len(choice.prompt_token_ids), len(choice.token_ids)
        yield chunk(None, usage=Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n))
    yield SSE_DONE


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
