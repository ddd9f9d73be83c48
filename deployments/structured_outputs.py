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
