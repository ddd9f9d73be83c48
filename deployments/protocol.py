"""The OpenAI API's request and response bodies, as far as nextserve serves them, with vLLM's
extensions (`top_k`, `ignore_eos`, `stop_token_ids`, `return_token_ids`). Requests are checked
here; a bad field becomes an HTTP 400 that names it."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from engine.sampling import MAX_TOP_LOGPROBS


class _Request(BaseModel):
    # Clients send fields we do not use (user, presence_penalty at 0, ...); vLLM ignores them too.
    model_config = ConfigDict(extra="ignore", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON may carry lone surrogates ("\ud800"), which Python accepts in a str and the
        # tokenizer does not: refuse them here, as bad input, not deep in tokenising.
        bad = _lone_surrogate(data)
        if bad is not None:
            raise ValueError(f"text is not valid Unicode (a lone surrogate in {bad!r})")
        return data


def _lone_surrogate(value: Any, depth: int = 0) -> str | None:
    """The first string under `value` that cannot be encoded as UTF-8, if any."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "backslashreplace").decode()[:40]
        return None
    if depth > 32:  # deeper than any valid request; the field validators refuse it anyway
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        bad = _lone_surrogate(k, depth + 1) if isinstance(k, str) else None
        bad = bad or _lone_surrogate(v, depth + 1)
        if bad is not None:
            return bad
    return None


class StreamOptions(_Request):
    include_usage: bool = True  # nextserve always ends a stream with a usage chunk


class _SamplingFields(_Request):
    model: str
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(-1, ge=-1, description="vLLM extension; -1 or 0: off")
    n: int = Field(1, ge=1, le=1, description="one choice per prompt")
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = Field(False, description="vLLM extension: token ids of prompt and output")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


PromptType = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(_SamplingFields):
    prompt: PromptType
    max_tokens: int | None = Field(16, ge=0, description="0 only with echo: score the prompt")
    logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one text, one token list, or a list of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Request):
    type: str
    text: str | None = None  # of "text" parts; other kinds (images) carry other fields


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None

    def text(self) -> str:
        """Content as text; of a list of parts only the text parts count (no images here)."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text or "" for part in self.content if part.type == "text")


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None


# -- responses --------------------------------------------------------------------------------
class _Response(BaseModel):
    model_config = ConfigDict(frozen=True)


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


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


class ChatResponseMessage(_Response):
    role: str | None = None
    content: str | None = None


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
    kind = {400: "BadRequestError", 404: "NotFoundError", 429: "RateLimitError",
            503: "ServiceUnavailableError", 504: "APITimeoutError"}.get(status, "InternalServerError")
    return {"error": {"message": message, "type": kind, "param": param, "code": code or status}}
