"""vLLM's POST /tokenize (a text prompt, or chat messages rendered as /v1/chat/completions renders
them) and POST /detokenize, in vLLM's request and response shapes."""

from __future__ import annotations

import asyncio
from typing import Any

from deployments.chat_completions import render_prompt
from deployments.request_models import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest
from deployments.response_models import DetokenizeResponse, TokenizeResponse
from deployments.serving import APIError, ServingContext

TokenizeRequest = TokenizeCompletionRequest | TokenizeChatRequest


def parse_tokenize(body: Any) -> TokenizeRequest:
    """vLLM's rule: a body with `messages` is a chat request, any other a text one. Raises
    pydantic's ValidationError, which the route answers with a 400 naming the field."""
    if isinstance(body, dict) and "messages" in body:
        return TokenizeChatRequest.model_validate(body)
    return TokenizeCompletionRequest.model_validate(body)


def _tokenize(ctx: ServingContext, req: TokenizeRequest) -> TokenizeResponse:
    if req.model is not None:
        ctx.check_model(req.model)
    if isinstance(req, TokenizeChatRequest):
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        _, ids = render_prompt(ctx, req.messages, req.add_generation_prompt, req.chat_template_kwargs,
                               add_special_tokens=req.add_special_tokens, tools=tools)
    else:
        ids = ctx.encode(req.prompt, "prompt", add_special_tokens=req.add_special_tokens)
    return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids,
                            token_strs=ctx.tokenizer.token_strs(ids) if req.return_token_strs else None)


async def tokenize(ctx: ServingContext, req: TokenizeRequest) -> TokenizeResponse:
    return await asyncio.to_thread(_tokenize, ctx, req)  # rendering and tokenizing: off the event loop


def _detokenize(ctx: ServingContext, req: DetokenizeRequest) -> DetokenizeResponse:
    if req.model is not None:
        ctx.check_model(req.model)
    limit = ctx.token_id_limit
    bad = next((t for t in req.tokens if not 0 <= t < limit), None)
    if bad is not None:
        raise APIError(400, f"tokens: token id {bad} is out of vocabulary (0..{limit - 1})", param="tokens")
    return DetokenizeResponse(prompt=ctx.tokenizer.decode(req.tokens, skip_special_tokens=False))


async def detokenize(ctx: ServingContext, req: DetokenizeRequest) -> DetokenizeResponse:
    return await asyncio.to_thread(_detokenize, ctx, req)

