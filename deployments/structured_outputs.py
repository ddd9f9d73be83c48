"""A request's structured-output fields → the engine's StructuredOutputsParams, checked here so a
bad schema, regex or grammar is a 400 naming the request field before the request reaches the
engine (which compiles the grammar against the vocabulary: engine/structured_output.py).

Accepted, at most one per request: OpenAI's `response_format` (json_object, json_schema; "text"
is the default), vLLM's `structured_outputs` {json, regex, choice, grammar, json_object} and its
older `guided_json`, `guided_regex`, `guided_choice` and `guided_grammar`. Grammars are EBNF in
xgrammar's GBNF dialect (`root ::= ...`), as vLLM's xgrammar backend takes them."""

from __future__ import annotations

from typing import Any

from deployments.serving import APIError
from engine.structured_output import StructuredOutputError, StructuredOutputsParams, grammar_of

GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice",
          "guided_grammar": "grammar"}


def structured_outputs_params(req: Any) -> StructuredOutputsParams | None:
    """The request's structured-output spec (None if it has none); APIError 400 naming the field
    if it is malformed, unsupported, or given twice. Parses the spec (no tokenizer needed): run
    it off the event loop, as the routes' `prepare` runs."""
    rf = req.response_format
    sources = (["response_format"] if rf is not None and rf.type != "text" else []) \
        + (["structured_outputs"] if req.structured_outputs is not None else []) \
        + [k for k in GUIDED if getattr(req, k) is not None]
    if len(sources) > 1:
        raise APIError(400, f"{sources[1]}: only one of response_format, structured_outputs and the "
                            f"guided_* fields may be given; got {', '.join(sources)}", param=sources[1])
    if not sources:
        return None
    source = sources[0]
    fields: dict[str, str]  # the spec's field → the request field it came from, for errors
    if source == "response_format":
        if rf.type == "json_object":
            spec, fields = {"json_object": True}, {"json_object": "response_format"}
        else:
            where = "response_format.json_schema"
            if rf.json_schema is None:
                raise APIError(400, f"{where} is required with type json_schema", param="response_format")
            if rf.json_schema.schema_ is None:
                raise APIError(400, f"{where}.schema is required", param="response_format")
            spec, fields = {"json": rf.json_schema.schema_}, {"json": f"{where}.schema"}
    elif source == "structured_outputs":
        so = req.structured_outputs
        spec = {"json": so.json_, "regex": so.regex, "grammar": so.grammar,
                "choice": tuple(so.choice) if so.choice is not None else None,
                "json_object": bool(so.json_object), "disable_any_whitespace": so.disable_any_whitespace}
        fields = {k: f"structured_outputs.{k}" for k in spec}
    else:
        value = getattr(req, source)
        kind = GUIDED[source]
        spec = {kind: tuple(value) if kind == "choice" else value}
        fields = {kind: source}
    try:
        params = StructuredOutputsParams(**spec)
        grammar_of(params)  # the spec parses: what the engine compiles cannot fail on it later
    except StructuredOutputError as e:
        field = fields.get(e.field, source)
        raise APIError(400, f"{field}: {e}", param=field) from None
    return params


def tool_call_params(tools: list[Any], only: str | None, max_calls: int | None) -> StructuredOutputsParams:
    """A grammar that makes the model write tool calls in Qwen's hermes form and nothing else:
    `tool_choice` "required" (calls to any of `tools`) or a named function (`only`: one call to
    it), as vLLM enforces both. Each call is `<tool_call>\\n{"name": ..., "arguments": ...}\\n
    </tool_call>` (JSON with the separators Qwen writes, no free whitespace) with `arguments`
    valid against the function's `parameters`; calls follow one
    another on new lines (Qwen3's template joins them so), at most `max_calls` (None: any number,
    at least one). APIError 400 naming `tools` if a function's parameters are not a schema the
    grammar can enforce."""
    from engine.structured_output import json_ebnf

    chosen = [t for t in tools if only is None or t.function.name == only]
    schemas = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                                 "arguments": t.function.parameters or {"type": "object"}},
                "required": ["name", "arguments"]} for t in chosen]
    try:
        one = json_ebnf(schemas, prefix="<tool_call>\n", suffix="\n</tool_call>", any_whitespace=False)
    except StructuredOutputError as e:
        raise APIError(400, f"tools: a function's parameters cannot be enforced as tool_choice asks: {e}",
                       param="tools") from None
    # json_ebnf's start rule is `root`; rename it so a new root can repeat one call
    lines = one.splitlines()
    if not lines or not lines[0].startswith("root ::= "):
        raise RuntimeError(f"unexpected grammar from json_ebnf: {one[:80]!r}")
    lines[0] = "tool_call_one ::= " + lines[0][len("root ::= "):]
    repeat = "" if max_calls == 1 else ' ("\\n" tool_call_one)*'
    return StructuredOutputsParams(grammar="\n".join([f"root ::= tool_call_one{repeat}", *lines]))
