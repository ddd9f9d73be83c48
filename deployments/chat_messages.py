"""The messages of a chat request (text content parts, past tool calls, tool results) and its
tools and tool_choice, as OpenAI's API sends them and chat templates receive them."""

from __future__ import annotations

import json
from typing import Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator

from deployments.request_fields import RequestModel


class ContentPart(RequestModel):
    type: Literal["text"]  # images and audio are not implemented: refused, not dropped
    text: str


class ToolCallFunction(RequestModel):
    name: str
    arguments: str | dict[str, Any] = ""  # OpenAI sends JSON text; templates get an object

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, arguments: str | dict[str, Any]) -> str | dict[str, Any]:
        _arguments_object(arguments)
        return arguments


class MessageToolCall(RequestModel):
    """A past call in an assistant message, as OpenAI returned it."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: ToolCallFunction
    index: int | None = None  # kept by clients that rebuilt the call from a stream; not rendered


class ChatMessage(RequestModel):
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


class FunctionDefinition(RequestModel):
    name: str = Field(pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class ChatTool(RequestModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(RequestModel):
    name: str


class NamedToolChoice(RequestModel):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice
