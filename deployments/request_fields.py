"""Which OpenAI and vLLM request fields nextserve refuses unless they carry their neutral value
(UNSUPPORTED) and which it accepts without effect (NO_EFFECT), and the base models every request
body is built on: unknown fields refused as OpenAI refuses them, invalid Unicode refused, nothing
ignored silently. README's "Request fields" table lists them (tests/deployments/test_protocol_fields.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, get_args

from pydantic import BaseModel, ConfigDict, model_validator
from pydantic_core import PydanticCustomError


def neutral(*values: Any) -> Callable[[Any], bool]:
    """A test for a field's value: true for any of `values`, the ones that mean "not used"."""
    return lambda v: any(v == x for x in values)


_OFF = neutral(None)
# OpenAI and vLLM request fields that nextserve does not implement: accepted only at the value
# that means "not used", refused with a 400 naming them otherwise.
UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    # best_of > 1 as vLLM V1 refuses it: sample n instead
    "length_penalty": neutral(None, 1), "best_of": neutral(None, 1),
    "tools": neutral(None, []), "tool_choice": neutral(None, "none", "auto"),
    "parallel_tool_calls": neutral(None, True, False),
    "functions": neutral(None, []), "function_call": neutral(None, "none", "auto"),
    "use_beam_search": neutral(None, False), "logits_processors": neutral(None, []),
    # one structured-output backend (xgrammar): naming it is fine, any other is refused
    "guided_decoding_backend": neutral(None, "auto", "xgrammar"), "guided_whitespace_pattern": _OFF,
    "allowed_token_ids": _OFF, "bad_words": neutral(None, []), "truncate_prompt_tokens": _OFF,
    "include_stop_str_in_output": neutral(None, False), "skip_special_tokens": neutral(None, True),
    "spaces_between_special_tokens": neutral(None, True), "prompt_logprobs": _OFF,
    "return_tokens_as_token_ids": neutral(None, False), "suffix": neutral(None, ""),
    "audio": _OFF, "modalities": neutral(None, ["text"]), "prediction": _OFF,
    "reasoning_effort": _OFF, "verbosity": _OFF, "web_search_options": _OFF,
    "continue_final_message": neutral(None, False), "documents": neutral(None, []),
    "chat_template": _OFF, "mm_processor_kwargs": _OFF, "priority": neutral(None, 0),
    "kv_transfer_params": _OFF, "vllm_xargs": _OFF,
}
# Fields with no effect on the output: accepted and not used.
NO_EFFECT = frozenset({"user", "metadata", "store", "service_tier", "request_id", "cache_salt",
                       "safety_identifier", "prompt_cache_key"})


class RequestModel(BaseModel):
    """A request body or a part of one: frozen, unknown keys refused, text valid Unicode."""

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


class RouteRequest(RequestModel):
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
            is_neutral = cls._neutral_overrides.get(key) or UNSUPPORTED.get(key)
            if value is None and key in cls.model_fields and not _nullable(cls.model_fields[key].annotation):
                continue  # OpenAI's clients send null for "not set": the default
            if is_neutral is not None and key not in cls.model_fields:
                if not is_neutral(value):
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
