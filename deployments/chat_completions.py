"""POST /v1/chat/completions: messages through the checkpoint's chat template, `n` choices,
streaming or not, with per-token logprobs and vLLM's `return_token_ids`; tools rendered by the
template, the model's `<tool_call>`s returned as tool_calls and its `<think>` text as
reasoning_content (deployments/tool_parser.py and reasoning_parser.py, on when
serve.tool_call_parser and serve.reasoning_parser say so).

tool_choice: auto (the default with tools) parses calls; none renders the tools but parses
nothing (as vLLM does); required and a named function are enforced as vLLM enforces them, by a
grammar (deployments/structured_outputs.py `tool_call_params`): the model can write only calls
to the allowed functions, with arguments valid against their parameters (one call for a named
function or with parallel_tool_calls false), so only max_tokens can cut a call short. The
grammar starts at the first output token, so such a request gets no reasoning. A named call
ends with finish_reason "stop", as OpenAI's do; other calls with "tool_calls"."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any

from deployments.chat import RESERVED_TEMPLATE_VARIABLES, ChatTemplateError, render_chat
from deployments.chat_messages import ChatMessage, NamedToolChoice
from deployments.reasoning_parser import Qwen3ReasoningParser
from deployments.request_models import ChatCompletionRequest
from deployments.response_models import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatResponseMessage,
    ChatTokenLogprob,
    FunctionCall,
    PromptTokensDetails,
    ResponseToolCall,
    TopLogprob,
    Usage,
)
from deployments.serving import SSE_DONE, APIError, Choice, ServingContext, new_id, run_choices, sse
from deployments.structured_outputs import structured_outputs_params, tool_call_params
from deployments.tool_parser import CallArguments, CallHeader, Content, HermesToolParser, ToolCall
from engine.llm_engine import TopLogprobs
from engine.sampling import SamplingParams


@dataclass(frozen=True)
class OutputPlan:
    """How a request's output text becomes a message: which parsers run, over what."""

    prompt_text: str
    reasoning: bool  # split <think> text off
    tool_names: frozenset[str] | None  # parse tool calls to these functions; None: no parsing
    max_calls: int | None  # 1 with parallel_tool_calls false
    named: bool  # tool_choice named a function
    include_reasoning: bool = True  # false: the reasoning is split off and dropped (vLLM's)

    def parser(self) -> OutputParser:
        return OutputParser(self)


class OutputParser:
    """Text deltas → (reasoning, content, tool-call pieces); the whole output is one delta."""

    def __init__(self, plan: OutputPlan) -> None:
        self.plan = plan
        self.reasoning = Qwen3ReasoningParser(plan.prompt_text) if plan.reasoning else None
        self.tools = HermesToolParser(set(plan.tool_names), plan.max_calls) if plan.tool_names else None

    def feed(self, text: str, final: bool) -> tuple[str, list[Content | CallHeader | CallArguments]]:
        if self.reasoning is None:
            reasoning, content = "", text
        else:
            reasoning, content = self.reasoning.feed(text)
            if final:
                r, c = self.reasoning.finish()
                reasoning, content = reasoning + r, content + c
            if not self.plan.include_reasoning:
                reasoning = ""
        if self.tools is None:
            return reasoning, [Content(content)] if content else []
        events = self.tools.feed(content) if content else []
        if final:
            events += self.tools.finish()
        return reasoning, events

    @property
    def had_reasoning(self) -> bool:
        return self.reasoning is not None and self.reasoning.reasoning_seen

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """The engine's reason, or "tool_calls" where the model stopped after calling (not for a
        named function: OpenAI answers those with "stop"); a call cut off by max_tokens keeps
        "length"."""
        called = self.tools is not None and self.tools.valid_calls
        if called and engine_reason == "stop" and not self.plan.named:
            return "tool_calls"
        return engine_reason


def render_prompt(ctx: ServingContext, messages: list[ChatMessage], add_generation_prompt: bool,
                  chat_template_kwargs: dict[str, Any] | None, add_special_tokens: bool = False,
                  tools: list[dict[str, Any]] | None = None) -> tuple[str, list[int]]:
    """The messages (and tools) through the checkpoint's chat template: the text and its token
    ids (also what /tokenize returns for them). Renders and tokenizes: run it off the event loop."""
    tok = ctx.tokenizer
    if not tok.chat_template:
        raise APIError(400, f"the model `{ctx.model_name}` has no chat template; use /v1/completions",
                       param="messages")
    kwargs = chat_template_kwargs or {}
    reserved = next((k for k in kwargs if k in RESERVED_TEMPLATE_VARIABLES), None)
    if reserved is not None:
        raise APIError(400, f"chat_template_kwargs: {reserved!r} is set by the server, not by a request",
                       param="chat_template_kwargs")
    if tools:
        kwargs = {**kwargs, "tools": tools}
    try:
        text = render_chat(tok.chat_template, [m.for_template() for m in messages], add_generation_prompt,
                           {"bos_token": tok.bos_token, "eos_token": tok.eos_token}, **kwargs)
    except ChatTemplateError as e:
        raise APIError(400, str(e), param="messages") from None
    # the template writes the special tokens: add_special_tokens is false unless asked for
    return text, ctx.encode(text, "messages", add_special_tokens=add_special_tokens)


def prepare(ctx: ServingContext,
            req: ChatCompletionRequest) -> tuple[list[Choice], list[SamplingParams], OutputPlan]:
    """The request's n choices (each an engine request of its own), their sampling params and how
    their output text becomes a message."""
    ctx.check_model(req.model)
    ctx.check_choices(1, req.n)
    tool_names = _check_tools(ctx, req)
    # as transformers and vLLM hand them over: OpenAI's tool objects, as the client wrote them
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    text, ids = render_prompt(ctx, req.messages, req.add_generation_prompt, req.chat_template_kwargs,
                              tools=tools)
    if not ids:
        raise APIError(400, "messages render to an empty prompt", param="messages")
    max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    structured = structured_outputs_params(req)
    choice = req.effective_tool_choice
    if tool_names is not None and choice != "auto":  # required or a named function: enforced
        if structured is not None:
            raise APIError(400, "tool_choice: a required or named tool call cannot be combined with "
                                "response_format or other structured outputs", param="tool_choice")
        named = choice.function.name if isinstance(choice, NamedToolChoice) else None
        structured = tool_call_params(req.tools, named, 1 if named or not req.parallel_tool_calls else None)
    params = [ctx.sampling_params(req, len(ids), max_tokens, choice=i, logprobs=req.logprobs,
                                  top_logprobs=req.top_logprobs if req.logprobs else 0,
                                  structured_outputs=structured) for i in range(req.n)]
    enforced = tool_names is not None and choice != "auto"
    plan = OutputPlan(prompt_text=text, reasoning=ctx.reasoning_parser == "qwen3" and not enforced,
                      tool_names=tool_names,
                      include_reasoning=req.include_reasoning,
                      max_calls=None if req.parallel_tool_calls else 1,
                      named=isinstance(req.effective_tool_choice, NamedToolChoice))
    return [Choice(i, ids) for i in range(req.n)], params, plan


def _check_tools(ctx: ServingContext, req: ChatCompletionRequest) -> frozenset[str] | None:
    """The function names whose calls this request's output may carry; None: no tool parsing."""
    names = [t.function.name for t in req.tools or ()]
    if len(set(names)) != len(names):
        raise APIError(400, "tools: two tools have the same function name", param="tools")
    choice = req.effective_tool_choice
    named = isinstance(choice, NamedToolChoice)
    shown = f"named function {choice.function.name!r}" if named else repr(choice)
    if choice not in ("none", "auto") and not names:
        raise APIError(400, f"tool_choice {shown} needs tools", param="tool_choice")
    if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
        raise APIError(400, f"tool_choice: no tool named {choice.function.name!r} in tools",
                       param="tool_choice")
    if names and "tools" not in (ctx.tokenizer.chat_template or ""):
        raise APIError(400, f"tools: the chat template of `{ctx.model_name}` does not render tools",
                       param="tools")
    if choice == "none" or not names:
        return None
    if ctx.tool_call_parser == "none":
        raise APIError(400, f"tool_choice {shown} needs a tool call parser; this server runs without one "
                            f"(serve.tool_call_parser: none)", param="tool_choice")
    return frozenset([choice.function.name] if isinstance(choice, NamedToolChoice) else names)


def _tool_calls(calls: list[ToolCall]) -> list[ResponseToolCall] | None:
    return [ResponseToolCall(id=c.id, type="function",
                             function=FunctionCall(name=c.name, arguments=c.arguments))
            for c in calls] or None


async def complete(ctx: ServingContext, req: ChatCompletionRequest) -> ChatCompletionResponse:
    choices, params, plan = await asyncio.to_thread(prepare, ctx, req)
    request_id = new_id("chatcmpl")
    async with aclosing(run_choices(ctx, request_id, choices, params)) as outs:
        async for _ in outs:
            pass
    out = []
    for c in choices:
        lp = _logprobs(ctx, c.token_ids, c.logprobs, c.top_logprobs) if req.logprobs else None
        message, finish_reason = _message(plan, c)
        out.append(ChatChoice(index=c.index, message=message, logprobs=lp, finish_reason=finish_reason,
                              token_ids=c.token_ids if req.return_token_ids else None))
    return ChatCompletionResponse(
        id=request_id, created=int(time.time()), model=ctx.model_name, choices=out, usage=_usage(choices),
        prompt_token_ids=choices[0].prompt_token_ids if req.return_token_ids else None)


def _message(plan: OutputPlan, choice: Choice) -> tuple[ChatResponseMessage, str | None]:
    """The whole output as a message, and its finish_reason. A call that turned out malformed
    after a stream would have sent its header is answer text here, where it stood."""
    parser = plan.parser()
    reasoning, events = parser.feed(choice.text, final=True)
    broken = {c.index: c.raw for c in parser.tools.calls if c.broken} if parser.tools else {}
    content = "".join(e.text if isinstance(e, Content) else broken[e.index] for e in events
                      if isinstance(e, Content) or (isinstance(e, CallHeader) and e.index in broken))
    calls = parser.tools.valid_calls if parser.tools else []
    for i, c in enumerate(calls):
        c.index = i
    reasoning_text = reasoning if parser.had_reasoning and plan.include_reasoning else None
    if not content and (calls or reasoning_text is not None):
        content = None
    message = ChatResponseMessage(role="assistant", content=content, reasoning_content=reasoning_text,
                                  reasoning=reasoning_text, tool_calls=_tool_calls(calls))
    return message, parser.finish_reason(choice.finish_reason)


async def stream(ctx: ServingContext, req: ChatCompletionRequest) -> AsyncIterator[str]:
    choices, params, plan = await asyncio.to_thread(prepare, ctx, req)
    request_id, created = new_id("chatcmpl"), int(time.time())
    parsers = {c.index: plan.parser() for c in choices}  # each choice's text is parsed on its own

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
            parser = parsers[choice.index]
            delta = _delta(*parser.feed(out.new_text, final=out.finished))
            if delta is None and lp is None and not out.finished and not req.return_token_ids:
                continue  # everything new is held (a tag may be starting)
            yield chunk(ChatChunkChoice(
                index=choice.index, delta=delta or ChatResponseMessage(content=""), logprobs=lp,
                finish_reason=parser.finish_reason(choice.finish_reason) if out.finished else None,
                token_ids=list(out.new_token_ids) if req.return_token_ids else None))
    if req.stream_options is None or req.stream_options.include_usage:
        yield chunk(None, usage=_usage(choices))
    yield SSE_DONE


def _usage(choices: list[Choice]) -> Usage:
    """The prompt once, as OpenAI and vLLM count it; every choice's output."""
    p, n = len(choices[0].prompt_token_ids), sum(len(c.token_ids) for c in choices)
    cached = PromptTokensDetails(cached_tokens=choices[0].num_cached_tokens or 0)
    return Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n, prompt_tokens_details=cached)


def _delta(reasoning: str, events: list[Content | CallHeader | CallArguments]) -> ChatResponseMessage | None:
    """One chunk's delta: reasoning, content and tool-call pieces (OpenAI's: the first piece of a
    call has its index, id, type and name, the next ones only argument text)."""
    content = "".join(e.text for e in events if isinstance(e, Content))
    calls: list[ResponseToolCall] = []
    for e in events:
        if isinstance(e, CallHeader):
            calls.append(ResponseToolCall(index=e.index, id=e.id, type="function",
                                          function=FunctionCall(name=e.name, arguments="")))
        elif isinstance(e, CallArguments) and e.text:
            if calls and calls[-1].index == e.index:  # one piece per call and chunk
                last = calls[-1]
                calls[-1] = last.model_copy(update={"function": FunctionCall(
                    name=last.function.name, arguments=(last.function.arguments or "") + e.text)})
            else:
                calls.append(ResponseToolCall(index=e.index, function=FunctionCall(arguments=e.text)))
    if not (reasoning or content or calls):
        return None
    return ChatResponseMessage(content=content or None, reasoning_content=reasoning or None,
                               reasoning=reasoning or None, tool_calls=calls or None)


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
