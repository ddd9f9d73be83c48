"""The bodies of the routes nextserve serves: OpenAI's completions and chat completions requests
with vLLM's extensions (`top_k`, `min_p`, `repetition_penalty`, `min_tokens`, `ignore_eos`,
`stop_token_ids`, `return_token_ids`, structured outputs) and vLLM's /tokenize and /detokenize
bodies. Requests are checked here; a bad field becomes an HTTP 400 that names it."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator

from deployments.chat_messages import ChatMessage, ChatTool, NamedToolChoice, ToolChoice
from deployments.request_fields import RequestModel, RouteRequest, neutral
from engine.sampling import MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS

MAX_STOP_STRINGS = 16  # OpenAI takes 4; enough for chat formats' end markers
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 1024
MAX_LOGIT_BIAS_TOKENS = 1024  # entries of logit_bias; each step adds them to the logits
MAX_TOOLS = 128  # OpenAI's limit


class StreamOptions(RequestModel):
    include_usage: bool = True  # nextserve always ends a stream with a usage chunk
    continuous_usage_stats: Literal[False] = False  # vLLM's; not implemented


class JsonSchemaFormat(RequestModel):
    """response_format.json_schema, as OpenAI's: the schema is enforced whatever `strict` says."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # `schema` would shadow BaseModel's
    strict: bool | None = None


class ResponseFormat(RequestModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(RequestModel):
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


class _SamplingFields(RouteRequest):
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
        "add_special_tokens": neutral(None, True)}  # text prompts are encoded with them

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one text, one token list, or a list of either."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if p and all(isinstance(x, int) for x in p):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


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
        "add_special_tokens": neutral(None, False),  # the template writes the special tokens
        "echo": neutral(None, False)}


class TokenizeCompletionRequest(RouteRequest):
    """vLLM's /tokenize body for text."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool = False


class TokenizeChatRequest(RouteRequest):
    """vLLM's /tokenize body for messages, rendered as /v1/chat/completions renders them."""

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the template writes them
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[ChatTool] | None = Field(None, max_length=MAX_TOOLS)  # rendered as chat renders them


class DetokenizeRequest(RouteRequest):
    model: str | None = None
    tokens: list[int]

