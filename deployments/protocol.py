"""The OpenAI API's request and response bodies, as far as nextserve serves them, with vLLM's
extensions (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`, `stop_token_ids`,
`return_token_ids`) and vLLM's /tokenize and /detokenize bodies. Requests are checked
here; a bad field becomes an HTTP 400 that names it. Nothing is ignored silently: a field this
server does not implement is refused unless it has its neutral value, and an unknown field is
refused as OpenAI refuses it."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator
from pydantic_core import PydanticCustomError

from engine.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 16  # OpenAI takes 4; enough for chat formats' end markers
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_TOKENS = 1024  # entries of logit_bias; each step adds them to the logits
MAX_TOOLS = 128  # OpenAI's limit


def _neutral(*values: Any) -> Callable[[Any], bool]:
    return lambda v: any(v == x for x in values)


_OFF = _neutral(None)
# OpenAI and vLLM request fields that nextserve does not implement: accepted only at the value
# that means "not used", refused with a 400 naming them otherwise.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    # best_of > 1 as vLLM V1 refuses it: sample n instead
    "length_penalty": _neutral(None, 1), "best_of": _neutral(None, 1),
    "tools": _neutral(None, []), "tool_choice": _neutral(None, "none", "auto"),
    "parallel_tool_calls": _neutral(None, True, False),
    "functions": _neutral(None, []), "function_call": _neutral(None, "none", "auto"),
    "use_beam_search": _neutral(None, False), "logits_processors": _neutral(None, []),
    # one structured-output backend (xgrammar): naming it is fine, any other is refused
    "guided_decoding_backend": _neutral(None, "auto", "xgrammar"), "guided_whitespace_pattern": _OFF,
    "allowed_token_ids": _OFF, "bad_words": _neutral(None, []), "truncate_prompt_tokens": _OFF,
    "include_stop_str_in_output": _neutral(None, False), "skip_special_tokens": _neutral(None, True),
    "spaces_between_special_tokens": _neutral(None, True), "prompt_logprobs": _OFF,
    "return_tokens_as_token_ids": _neutral(None, False), "suffix": _neutral(None, ""),
    "audio": _OFF, "modalities": _neutral(None, ["text"]), "prediction": _OFF,
    "reasoning_effort": _OFF, "verbosity": _OFF, "web_search_options": _OFF,
    "continue_final_message": _neutral(None, False), "documents": _neutral(None, []),
    "chat_template": _OFF, "mm_processor_kwargs": _OFF, "priority": _neutral(None, 0),
    "kv_transfer_params": _OFF, "vllm_xargs": _OFF,
}
# Fields with no effect on the output: accepted and not used.
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "request_id", "cache_salt",
                       "safety_identifier", "prompt_cache_key"})


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _valid_unicode(cls, data: Any) -> Any:
        # JSON may carry lone surrogates ("\ud800"), which Python accepts in a str and the
        # tokenizer does not: refuse them here, as bad input, not deep in tokenising.
        bad = _lone_surrogate(data)
        if bad is not None:
            raise ValueError(f"text is not valid Unicode (a lone surrogate in {bad!r})")
        return data


class _TopLevelRequest(_Request):
    """A route's body: unimplemented fields refused unless neutral (and then dropped), fields
    without effect dropped, nulls taken as "not set"; what is left must be a known field."""

    # the route's own neutral values where they differ from UNSUPPORTED's
    _neutral_overrides: ClassVar[dict[str, Callable[[Any], bool]]] = {}

    @model_validator(mode="before")
    @classmethod
    def _unsupported_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        kept = {}
        for key, value in data.items():
            neutral = cls._neutral_overrides.get(key) or UNSUPPORTED.get(key)
            if value is None and key in cls.model_fields and not _nullable(cls.model_fields[key].annotation):
                continue  # OpenAI's clients send null for "not set": the default
            if neutral is not None and key not in cls.model_fields:
                if not neutral(value):
                    raise PydanticCustomError(
                        "unsupported_field", "{field} is not supported by this server (got {value})",
                        {"field": key, "value": repr(value)[:100]})
            elif key not in NO_EFFECT:
                kept[key] = value
        return kept


def _nullable(annotation: Any) -> bool:
    return annotation is None or type(None) in get_args(annotation)


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
    continuous_usage_stats: Literal[False] = False  # vLLM's; not implemented


class JsonSchemaFormat(_Request):
    """response_format.json_schema, as OpenAI's: the schema is enforced whatever `strict` says."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` would shadow BaseModel's
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(_Request):
    """vLLM's `structured_outputs` (>= 0.10): one of json, regex, choice, grammar, json_object."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    json_: dict[str, Any] | bool | str | None = Field(None, alias="json")  # `json` would shadow BaseModel's
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False
    disable_fallback: bool = False  # one backend: nothing to fall back to
    disable_additional_properties: bool = False  # what nextserve does anyway (strict schemas)
    whitespace_pattern: None = None  # not implemented: refused unless null
    structural_tag: None = None  # not implemented: refused unless null


class _SamplingFields(_TopLevelRequest):
    model: str
    # 0 < temperature < 0.01 is taken as 0.01 (as vLLM does): smaller ones overflow the logits
    temperature: float = Field(1.0, ge=0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    top_k: int = Field(-1, ge=-1, description="vLLM extension; -1 or 0: off; at least the vocabulary: off")
    min_p: float = Field(0.0, ge=0, le=1, allow_inf_nan=False, description="vLLM extension; 0: off")
    presence_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2, le=2, allow_inf_nan=False)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False, description="vLLM extension; 1: off")
    logit_bias: dict[str, float] | None = Field(None, max_length=MAX_LOGIT_BIAS_TOKENS)
    min_tokens: int = Field(0, ge=0, description="vLLM extension: no EOS or stop before this many tokens")
    n: int = Field(1, ge=1, description="choices per prompt, each an engine request of its own")
    seed: int | None = Field(None, ge=-(2**63), lt=2**64, description="what torch.Generator takes")
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    return_token_ids: bool = Field(False, description="vLLM extension: token ids of prompt and output")
    # Structured outputs (deployments/structured_outputs.py): OpenAI's response_format, vLLM's
    # structured_outputs and its older guided_* fields; at most one of them per request.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | bool | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stop(cls, stop: str | list[str] | None) -> str | list[str] | None:
        strings = [stop] if isinstance(stop, str) else stop or []
        if len(strings) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(strings)}")
        longest = max(map(len, strings), default=0)
        if longest > MAX_STOP_STRING_CHARS:
            raise ValueError(f"stop strings of at most {MAX_STOP_STRING_CHARS} characters, got one of "
                             f"{longest}")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for key, value in (bias or {}).items():
            if not re.fullmatch(r"[0-9]+", key.strip()):  # JSON keys are strings; OpenAI's are token ids
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -MAX_LOGIT_BIAS <= value <= MAX_LOGIT_BIAS:
                raise ValueError(f"biases must be in [-{MAX_LOGIT_BIAS}, {MAX_LOGIT_BIAS}], got {value} for "
                                 f"token {key}")
        return bias

    @property
    def logit_bias_ids(self) -> dict[int, float]:
        return {int(k): v for k, v in (self.logit_bias or {}).items()}

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
    _neutral_overrides: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "add_special_tokens": _neutral(None, True)}  # text prompts are encoded with them

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one text, one token list, or a list of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ContentPart(_Request):
    type: Literal["text"]  # images and audio are not implemented: refused, not dropped
    text: str


class ToolCallFunction(_Request):
    name: str
    arguments: str | dict[str, Any] = ""  # OpenAI sends JSON text; templates get an object

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str | dict[str, Any]) -> str | dict[str, Any]:
        _arguments_object(arguments)
        return arguments


class MessageToolCall(_Request):
    """A past call in an assistant message, as OpenAI returned it."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction
    index: int | None = None  # kept by clients that rebuilt the call from a stream; not rendered


class ChatMessage(_Request):
    role: str
    content: str | list[ContentPart] | None = None
    # handed to the chat template as they are: it decides what a name or a past tool call says
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None  # vLLM's newer name for reasoning_content
    # Keys of OpenAI's response message that clients send back as they got them (a message
    # object dumped whole): accepted empty, refused by name otherwise.
    _EMPTY_RESPONSE_KEYS: ClassVar[dict[str, tuple[Any, ...]]] = {
        "refusal": (None,), "annotations": (None, []), "audio": (None,), "function_call": (None,)}

    @model_validator(mode="before")
    @classmethod
    def _drop_empty_response_keys(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if not any(v == e for e in cls._EMPTY_RESPONSE_KEYS.get(k, ())) or k in cls.model_fields}
        return data

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content: Any) -> Any:
        for part in content if isinstance(content, list) else ():
            kind = part.get("type") if isinstance(part, dict) else None
            if kind is not None and kind != "text":
                raise ValueError(f"content parts of type {kind!r} are not supported (only text)")
        return content

    @model_validator(mode="after")
    def _tool_message_names_its_call(self) -> ChatMessage:
        if self.role == "tool" and self.tool_call_id is None:  # OpenAI refuses it too
            raise ValueError("a message of role 'tool' needs tool_call_id")
        return self

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        extra = self.model_dump(exclude={"role", "content", "tool_calls", "reasoning"}, exclude_none=True)
        if self.reasoning is not None and self.reasoning_content is None:
            extra["reasoning_content"] = self.reasoning
        if self.tool_calls is not None:
            # as vLLM and transformers hand them to templates: arguments as an object
            extra["tool_calls"] = [{**c.model_dump(exclude={"index"}, exclude_none=True), "function": {
                "name": c.function.name, "arguments": _arguments_object(c.function.arguments)}}
                for c in self.tool_calls]
        return {"role": self.role, "content": self.text(), **extra}


def _arguments_object(arguments: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(arguments, dict):
        return arguments
    if not arguments.strip():
        return {}
    try:
        value = json.loads(arguments)
    except ValueError:
        raise ValueError("not valid JSON") from None
    if not isinstance(value, dict):
        raise ValueError("not a JSON object")
    return value


class FunctionDefinition(_Request):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(_Request):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS)
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: ToolChoice | None = None  # OpenAI's default: auto with tools, none without
    parallel_tool_calls: bool = True
    include_reasoning: bool = Field(True, description="vLLM's: false drops reasoning_content from the answer")

    @property
    def effective_tool_choice(self) -> Literal["none", "auto", "required"] | NamedToolChoice:
        if self.tool_choice is not None:
            return self.tool_choice
        return "auto" if self.tools else "none"
    _neutral_overrides: ClassVar[dict[str, Callable[[Any], bool]]] = {
        "add_special_tokens": _neutral(None, False),  # the template writes the special tokens
        "echo": _neutral(None, False)}


class TokenizeCompletionRequest(_TopLevelRequest):
    """vLLM's /tokenize body for text."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(_TopLevelRequest):
    """vLLM's /tokenize body for messages, rendered as /v1/chat/completions renders them."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the template writes them
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)  # rendered as chat renders them


class DetokenizeRequest(_TopLevelRequest):
    model: str | None = None
    tokens: list[int]


# -- responses --------------------------------------------------------------------------------
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
