"""Structured-output specs: what a request asks its output to follow (a JSON schema, any JSON
object, a regex, a list of choices or an EBNF grammar), checked without a tokenizer so a bad
spec is an error naming its field before the request reaches the engine, and turned into an
xgrammar grammar. JSON-schema keywords xgrammar accepts but does not enforce are refused, so that
every output validates. The runtime (compiling against the vocabulary, per-request matchers, the
batch's token masks) is engine/structured_output.py."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # xgrammar is imported when first needed: it pulls in transformers (~1 s)
    import xgrammar

MAX_SPEC_CHARS = 1 << 20  # a schema, regex or grammar longer than this is refused
KINDS = ("json", "json_object", "regex", "choice", "grammar")


class StructuredOutputError(ValueError):
    """A bad structured-output spec; `field` names the spec's field (json, regex, choice,
    grammar), which the HTTP layer maps to the request field it came from."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class StructuredOutputsParams:
    """vLLM's `structured_outputs` (>= 0.10): exactly one of json (a JSON schema: a dict or its
    text), json_object (any JSON object), regex, choice (the output is one of these strings) and
    grammar (EBNF in xgrammar's GBNF dialect). `disable_any_whitespace`: JSON without free
    whitespace between tokens (compact separators), which also keeps a weak model from spending
    its tokens on whitespace."""

    json: str | dict[str, Any] | bool | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.json, (dict, bool)):  # kept as text: hashable, and the cache's key
            object.__setattr__(self, "json", json.dumps(self.json))
        if self.choice is not None and not isinstance(self.choice, tuple):
            object.__setattr__(self, "choice", tuple(self.choice) if isinstance(self.choice, list)
                               else self.choice)
        given = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise StructuredOutputError(given[1] if given[1:] else "json",
                                        "structured outputs take exactly one of json, json_object, "
                                        f"regex, choice and grammar; got {given or 'none'}")
        for k in ("json", "regex", "grammar"):
            v = getattr(self, k)
            if v is not None and (not isinstance(v, str) or not v):
                raise StructuredOutputError(k, f"{k} must be a non-empty string, got {v!r}"[:200])
            if isinstance(v, str) and len(v) > MAX_SPEC_CHARS:
                raise StructuredOutputError(k, f"{k} has {len(v)} characters; at most {MAX_SPEC_CHARS}")
        if self.choice is not None:
            ok = (isinstance(self.choice, tuple) and self.choice
                  and all(isinstance(c, str) for c in self.choice))
            if not ok:
                raise StructuredOutputError("choice", f"choice must be a non-empty list of strings, got "
                                                      f"{self.choice!r}"[:200])
            if sum(map(len, self.choice)) > MAX_SPEC_CHARS:
                raise StructuredOutputError("choice", f"choice has more than {MAX_SPEC_CHARS} characters")
        if not isinstance(self.json_object, bool) or not isinstance(self.disable_any_whitespace, bool):
            raise StructuredOutputError("json_object", "json_object and disable_any_whitespace must be "
                                                       "booleans")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def key(self) -> tuple[str, str, bool]:
        """What the compiled grammar depends on: the cache's key."""
        kind = self.kind
        spec = {"json": self.json, "json_object": "", "regex": self.regex, "grammar": self.grammar,
                "choice": json.dumps(self.choice)}[kind]
        return kind, spec or "", self.disable_any_whitespace


def grammar_of(params: StructuredOutputsParams) -> xgrammar.Grammar:
    """The spec as an xgrammar Grammar (no tokenizer needed: this is the cheap check of a spec,
    which the HTTP layer runs before a request reaches the engine); StructuredOutputError naming
    the spec's field if it is malformed or unsupported."""
    import xgrammar as xgr

    kind = params.kind
    try:
        if kind in ("json", "json_object"):
            # strict_mode: properties a schema does not name are refused unless it allows them
            # (additionalProperties), as OpenAI's strict schemas; json_object takes any object.
            strict = kind == "json"
            if strict:
                value = _check_json(params.json)
                _refuse_unenforced(value)
                schema = json.dumps(_bounded_strings_as_patterns(value))
            else:
                schema = '{"type": "object"}'
            compact = params.disable_any_whitespace
            return xgr.Grammar.from_json_schema(schema, any_whitespace=not compact, strict_mode=strict,
                                                separators=(",", ":") if compact else None)
        if kind == "regex":
            return xgr.Grammar.from_regex(params.regex)
        if kind == "choice":
            return xgr.Grammar.from_ebnf(choice_ebnf(params.choice))
        return xgr.Grammar.from_ebnf(params.grammar)
    except StructuredOutputError:
        raise
    except Exception as e:  # xgrammar raises RuntimeError with its C++ source location
        raise StructuredOutputError(kind, f"invalid {kind}: {clean_error(e)}") from None


def json_ebnf(schemas: Sequence[str | dict[str, Any]], prefix: str = "", suffix: str = "",
              any_whitespace: bool = True) -> str:
    """EBNF (xgrammar's GBNF) for `prefix`, then a JSON value that validates against one of
    `schemas`, then `suffix`: e.g. a Qwen tool call, prefix "<tool_call>\\n", one schema per tool
    ({"name": {"const": ...}, "arguments": parameters}), suffix "\\n</tool_call>". Hand it to a
    request as StructuredOutputsParams(grammar=...). The schemas get the same checks and
    workarounds as a `json` spec; StructuredOutputError("json") if one is bad."""
    import xgrammar as xgr

    if not schemas:
        raise StructuredOutputError("json", "json_ebnf needs at least one schema")
    parts = []
    for schema in schemas:
        grammar = grammar_of(StructuredOutputsParams(json=schema, disable_any_whitespace=not any_whitespace))
        pieces = [xgr.Grammar.from_ebnf(f"root ::= {json.dumps(t, ensure_ascii=False)}")
                  for t in (prefix, suffix)]
        parts.append(xgr.Grammar.concat(pieces[0], grammar, pieces[1]) if prefix or suffix else grammar)
    return str(parts[0] if len(parts) == 1 else xgr.Grammar.union(*parts))


def choice_ebnf(choices: Sequence[str]) -> str:
    """root ::= "a" | "b" ...: JSON string escapes are valid GBNF string literals."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _check_json(schema: str | None) -> Any:
    try:
        value = json.loads(schema or "")
    except ValueError as e:
        raise StructuredOutputError("json", f"json: the schema is not valid JSON: {e}") from None
    if not isinstance(value, (dict, bool)):
        raise StructuredOutputError("json", f"json: a JSON schema is an object or a boolean, got "
                                            f"{type(value).__name__}")
    return value


_DATA_KEYS = frozenset({"enum", "const", "default", "examples"})  # values there are data, not schemas


# Keywords xgrammar 0.2.8 accepts and does not enforce (its output may break them): refused, so
# that every output validates. oneOf is taken as anyOf (pydantic's unions are exclusive anyway).
_UNENFORCED = ("not", "if", "then", "else", "dependentRequired", "dependentSchemas", "dependencies",
               "unevaluatedProperties", "unevaluatedItems", "minContains", "maxContains")
_NAMED = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"})


def _refuse_unenforced(schema: Any, where: str = "") -> None:
    if isinstance(schema, list):
        for i, v in enumerate(schema):
            _refuse_unenforced(v, f"{where}/{i}")
        return
    if not isinstance(schema, dict):
        return
    bad = next((k for k in _UNENFORCED if k in schema), None)
    if bad is None and schema.get("uniqueItems") is True:
        bad = "uniqueItems"
    if bad is None and isinstance(schema.get("allOf"), list) and len(schema["allOf"]) > 1:
        bad = "allOf"
    empty = next((k for k in ("anyOf", "oneOf", "allOf", "type", "enum") if schema.get(k) == []), None)
    if empty is not None:  # xgrammar would let it through as "" or as any value
        raise StructuredOutputError("json", f"json: {empty} (at #{where}) must be a non-empty array")
    if bad is None and ("pattern" in schema or "format" in schema) and (
            "minLength" in schema or "maxLength" in schema):
        bad = "minLength/maxLength with pattern or format"
    if bad is not None:
        raise StructuredOutputError("json", f"json: {bad} (at #{where}) is not supported: the grammar "
                                            f"backend cannot enforce it")
    for k, v in schema.items():
        if k in _DATA_KEYS:
            continue
        if k in _NAMED and isinstance(v, dict):  # keys there are names, not keywords
            for name, sub in v.items():
                _refuse_unenforced(sub, f"{where}/{k}/{name}")
        else:
            _refuse_unenforced(v, f"{where}/{k}")


def _bounded_strings_as_patterns(schema: Any) -> Any:
    """The schema with each length-bounded string ({"type": "string", "maxLength": n}, no pattern
    or format) bounded by an equivalent pattern ^.{min,max}$ instead. xgrammar 0.2.8 turns a
    length bound into a character class that admits raw control characters, which JSON forbids
    (mlc-ai/xgrammar#800: the output then fails to parse), while its pattern path is JSON-aware.
    `.` counts code points, as maxLength does, and leaves out line terminators, which only narrows
    what the model may write."""
    if isinstance(schema, list):
        return [_bounded_strings_as_patterns(v) for v in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: v if k in _DATA_KEYS else _bounded_strings_as_patterns(v) for k, v in schema.items()}
    lo, hi = out.get("minLength"), out.get("maxLength")
    bounded = isinstance(lo, int) or isinstance(hi, int)
    if (out.get("type") == "string" and bounded and "pattern" not in out and "format" not in out
            and not isinstance(lo, bool) and not isinstance(hi, bool)):
        lo = lo if isinstance(lo, int) else 0
        out.pop("minLength", None)
        out.pop("maxLength", None)
        out["pattern"] = f"^.{{{lo},{hi if isinstance(hi, int) else ''}}}$"
    return out


_LOCATION = re.compile(r"^\[[\d:]+\] \S+:\d+: (Check failed: \(.*?\) is false: )?")


def clean_error(e: Exception) -> str:
    """xgrammar's message without its timestamp and C++ source location."""
    text = _LOCATION.sub("", str(e).strip())
    return text.split("\n")[0][:500] or type(e).__name__
