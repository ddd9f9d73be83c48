"""The response bodies nextserve sends: OpenAI's completions, chat completions (whole and as
stream chunks) and model list, vLLM's /tokenize and /detokenize answers, and OpenAI's error body."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_serializer


class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


class PromptTokensDetails(_Response):
    cached_tokens: int  # prompt tokens served from the prefix cache, not computed


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(_Response):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    prompt_token_ids: list[int] | None = None
    token_ids: list[int] | None = None


class CompletionResponse(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob]


class FunctionCall(_Response):
    name: str | None = None
    arguments: str | None = None


class ResponseToolCall(_Response):
    """A tool call in a response message, or a piece of one in a stream's delta (`index` set,
    `id`, `type` and the name only in its first piece)."""

    index: int | None = None
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall

    @model_serializer(mode="wrap")
    def _without_nulls(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        out["function"] = {k: v for k, v in out["function"].items() if v is not None}
        return {k: v for k, v in out.items() if v is not None}


class ChatResponseMessage(_Response):
    role: str | None = None
    content: str | None = None
    # with a reasoning parser: the model's thinking (vLLM sends both names)
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[ResponseToolCall] | None = None

    @model_serializer(mode="wrap")
    def _without_unused(self, handler: Any) -> dict[str, Any]:
        out = handler(self)
        for key in ("reasoning_content", "reasoning", "tool_calls"):
            if out.get(key) is None:
                out.pop(key, None)
        return out


class ChatChoice(_Response):
    index: int
    message: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    prompt_token_ids: list[int] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatResponseMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    prompt_token_ids: list[int] | None = None


class TokenizeResponse(_Response):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(_Response):
    prompt: str


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nextserve"
    max_model_len: int


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict:
    """OpenAI's error form: {"error": {"message", "type", "param", "code"}}."""
    kind = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
            404: "NotFoundError", 413: "RequestTooLargeError", 429: "RateLimitError",
            503: "ServiceUnavailableError", 504: "APITimeoutError"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or status}}
