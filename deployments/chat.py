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


# Variables the renderer or transformers' apply_chat_template set themselves; a request's
# chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARIABLES = frozenset({
    "messages", "add_generation_prompt", "bos_token", "eos_token", "raise_exception", "tools",
    "documents", "template", "chat_template", "tokenize", "return_dict", "continue_final_message",
    "conversation", "tool_choice", "functions"})


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
    """The prompt text; ChatTemplateError for anything the template (or a value handed to it)
    raises: every such failure is the request's, never the server's."""
    context = {**kwargs, **(special_tokens or {}), "messages": messages,
               "add_generation_prompt": add_generation_prompt}
    try:
        return _compile(template).render(context)
    except TemplateError as e:
        raise ChatTemplateError(f"messages: the chat template refused them: {e}") from None
    except (TypeError, ValueError, AttributeError, LookupError, ArithmeticError, RecursionError) as e:
        # e.g. a chat_template_kwargs value of a type the template cannot use; only the type is
        # named: the exception's text may quote the template's internals
        raise ChatTemplateError(f"messages: the chat template failed on them ({type(e).__name__})") from None
