"""Chat messages → prompt text with the checkpoint's own Jinja chat template, rendered the way
transformers renders it (sandboxed, trim_blocks/lstrip_blocks, `raise_exception`, `tojson`)."""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template refused the messages (e.g. raise_exception on a bad role order)."""


def _raise(message: str) -> None:
    raise TemplateError(message)


@lru_cache(maxsize=4)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def render_chat(template: str, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                special_tokens: dict[str, str | None] | None = None, **kwargs: Any) -> str:
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **(special_tokens or {}), **kwargs)
    except TemplateError as e:
        raise ChatTemplateError(f"messages: the chat template refused them: {e}") from None
