"""POST /v1/completions: text or token-id prompts (one or a list), `n` choices each, streaming or
not, logprobs, and `echo` with the prompt's own logprobs, which evaluation harnesses use to score
text."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

from deployments.request_models import CompletionRequest
from deployments.response_models import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    PromptTokensDetails,
    Usage,
)
from deployments.serving import SSE_DONE, APIError, Choice, ServingContext, new_id, run_choices, sse
from deployments.structured_outputs import structured_outputs_params
from engine.llm_engine import TopLogprobs


def prepare(ctx: ServingContext, req: CompletionRequest):
    """(choices, sampling params, prompt texts) for the request, or APIError: choice i * n + j is
    prompt i's j-th (vLLM's order). Tokenizes: run it off the event loop (`asyncio.to_thread`),
    so a long prompt stalls no other stream."""
    ctx.check_model(req.model)
    if req.max_tokens == 0 and not req.echo:
        raise APIError(400, "max_tokens must be >= 1 unless echo is true, got 0", param="max_tokens")
    prompts = req.prompts()
    if not prompts:
        raise APIError(400, "prompt must not be empty", param="prompt")
    if len(prompts) > ctx.max_prompts:
        # never 429: retrying cannot help a request that no replica can ever admit
        raise APIError(400, f"prompt: {len(prompts)} prompts in one request; this server takes at most "
                            f"{ctx.max_prompts} (serve.max_prompts_per_request)", param="prompt")
    structured = structured_outputs_params(req)
    ctx.check_choices(len(prompts), req.n)
    choices, params, texts = [], [], []
    for i, p in enumerate(prompts):
        ids = ctx.encode(p, f"prompt[{i}]") if isinstance(p, str) else list(p)
        if not ids:
            raise APIError(400, f"prompt {i} encodes to no tokens", param="prompt")
        ctx.check_token_ids(ids, i)
        k = req.logprobs
        text = p if isinstance(p, str) else ctx.tokenizer.decode(ids, skip_special_tokens=False)
        for j in range(req.n):
            params.append(ctx.sampling_params(
                req, len(ids), req.max_tokens, choice=j, logprobs=k is not None, top_logprobs=k or 0,
                prompt_logprobs=k if (req.echo and k is not None) else None,
                structured_outputs=structured))
            choices.append(Choice(i * req.n + j, ids, drop_output=req.max_tokens == 0))
            texts.append(text)
    return choices, params, texts


async def complete(ctx: ServingContext, req: CompletionRequest) -> CompletionResponse:
    choices, params, texts = await asyncio.to_thread(prepare, ctx, req)
    request_id = new_id("cmpl")
    async with aclosing(run_choices(ctx, request_id, choices, params)) as outs:
        async for _ in outs:
            pass
    out = []
    for c, prompt_text in zip(choices, texts, strict=True):
        lp = None
        if req.logprobs is not None:
            lp = _logprobs(ctx, c, c.token_ids, c.logprobs, c.top_logprobs, req.echo, 0)
        out.append(CompletionChoice(
            index=c.index, text=(prompt_text if req.echo else "") + c.text, logprobs=lp,
            finish_reason=c.finish_reason, token_ids=c.token_ids if req.return_token_ids else None,
            prompt_token_ids=c.prompt_token_ids if req.return_token_ids else None))
    return CompletionResponse(id=request_id, created=int(time.time()), model=ctx.model_name, choices=out,
                              usage=_usage(choices, req.n))


async def stream(ctx: ServingContext, req: CompletionRequest) -> AsyncIterator[str]:
    """Server-sent events. The request is checked before the first event, so the caller can
    still answer a bad one with an error status."""
    choices, params, texts = await asyncio.to_thread(prepare, ctx, req)
    request_id, created = new_id("cmpl"), int(time.time())

    def chunk(choice: CompletionChoice) -> str:
        return sse(CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=[choice]))

    offsets = {c.index: 0 for c in choices}  # text offset, for logprobs' text_offset
    if req.echo:
        for c, text in zip(choices, texts, strict=True):
            # The prompt's logprobs arrive with the first output; echo the text now, them then.
            offsets[c.index] = len(text)
            ids = c.prompt_token_ids if req.return_token_ids else None
            yield chunk(CompletionChoice(index=c.index, text=text, prompt_token_ids=ids))
    async with aclosing(run_choices(ctx, request_id, choices, params)) as outs:
        async for c, out in outs:
            lp = None
            if req.logprobs is not None:
                lp = _logprobs(ctx, c, list(out.new_token_ids), list(out.new_logprobs or ()),
                               list(out.new_top_logprobs or ()), req.echo and out.prompt_logprobs is not None,
                               offsets[c.index])
            offsets[c.index] += len(out.new_text)
            if out.new_text or lp is not None or out.finished or req.return_token_ids:
                yield chunk(CompletionChoice(
                    index=c.index, text=out.new_text, logprobs=lp,
                    finish_reason=c.finish_reason if out.finished else None,
                    token_ids=list(out.new_token_ids) if req.return_token_ids else None,
                    prompt_token_ids=c.prompt_token_ids if req.return_token_ids and not req.echo
                    and len(c.token_ids) <= 1 else None))
    if req.stream_options is None or req.stream_options.include_usage:
        yield sse(CompletionResponse(id=request_id, created=created, model=ctx.model_name, choices=[],
                                     usage=_usage(choices, req.n)))
    yield SSE_DONE


def _usage(choices: list[Choice], n: int) -> Usage:
    """Each prompt counted once, as OpenAI and vLLM count it; every choice's output."""
    p = sum(len(c.prompt_token_ids) for c in choices[::n])
    cached = PromptTokensDetails(cached_tokens=sum(c.num_cached_tokens or 0 for c in choices[::n]))
    n = sum(len(c.token_ids) for c in choices)
    return Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n, prompt_tokens_details=cached)


def _logprobs(ctx: ServingContext, c: Choice, token_ids: list[int], logprobs: list[float],
              tops: list[TopLogprobs], with_prompt: bool, offset: int) -> CompletionLogprobs:
    """OpenAI's legacy logprobs block; with the prompt first when echoing (its first token has
    no logprob: nothing comes before it)."""
    ids: list[int] = []
    lps: list[float | None] = []
    top: list[dict[str, float] | None] = []
    if with_prompt and c.prompt_logprobs is not None:
        ids += c.prompt_token_ids
        lps += c.prompt_logprobs
        top += [None] + [_top(ctx, t, lp, k) for t, lp, k in zip(
            c.prompt_token_ids[1:], c.prompt_logprobs[1:], (c.prompt_top_logprobs or ())[1:], strict=True)]
        offset = 0
    ids += token_ids
    lps += logprobs
    top += [_top(ctx, t, lp, k) for t, lp, k in zip(token_ids, logprobs, tops or [()] * len(token_ids),
                                                    strict=True)]
    tokens = [ctx.token_text(t) for t in ids]
    text_offset = []
    for t in tokens:
        text_offset.append(offset)
        offset += len(t)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=top, text_offset=text_offset)


def _top(ctx: ServingContext, token_id: int, logprob: float | None, top: TopLogprobs) -> dict[str, float]:
    """The n likeliest tokens and, as vLLM reports it, the chosen one too."""
    d = ctx.top_dict(top)
    if logprob is not None:
        d.setdefault(ctx.token_text(token_id), logprob)
    return d
