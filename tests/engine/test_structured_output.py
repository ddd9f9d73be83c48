"""Structured outputs in the engine (engine/structured_output.py): specs are checked and errors
name their field, the bitmask applied in the sampler equals xgrammar's own kernel, compiled
grammars are cached (LRU), compiling holds back only its own request, and outputs of the
random-weight tiny model sampled at temperature 1 always parse and validate: JSON schemas fuzzed
by hypothesis, JSON objects, regexes, choices and EBNF grammars; EOS comes only where the
grammar may end, so max_tokens is the only way to an unfinished output. Also through the engine
core process."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import threading
import time

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core_client import EngineCoreClient
from engine.llm_engine import LLMEngine
from engine.local_executor import LocalExecutor
from engine.sampling import Sampler, SamplingParams
from engine.structured_output import (
    StructuredOutputError,
    StructuredOutputManager,
    StructuredOutputsParams,
    TokenMask,
    apply_token_mask,
    grammar_of,
    json_ebnf,
    tokenizer_info,
)
from engine.structured_spec import _bounded_strings_as_patterns
from engine.tokenizer import Tokenizer
from tests.engine.schemas import TOP_SCHEMAS

S = StructuredOutputsParams
PROMPT_TEXT = "<|im_start|>user\nAnswer in JSON.<|im_end|>\n<|im_start|>assistant\n"
MAX_TOKENS = 256


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("structured"), arch="qwen3_next")


def build_engine(model_dir, num_slots: int = 16) -> LLMEngine:
    torch.set_num_threads(1)  # also in the engine-core process, which this builds in
    return LLMEngine(LocalExecutor(model_dir, num_slots=num_slots, max_model_len=512),
                     tokenizer=Tokenizer(model_dir))


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return build_engine(tiny_dir)


@pytest.fixture(scope="module")
def prompt(engine):
    return engine.tokenizer.encode(PROMPT_TEXT)


def sampled(spec: StructuredOutputsParams, seed: int, max_tokens: int = MAX_TOKENS) -> SamplingParams:
    return SamplingParams(temperature=1.0, seed=seed, max_tokens=max_tokens, structured_outputs=spec)


# -- specs -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("spec", "field"), [
    (dict(json='{"type": "strin"}'), "json"),
    (dict(json="{not json"), "json"),
    (dict(json="[1, 2]"), "json"),
    (dict(regex="[a-"), "regex"),
    (dict(grammar="root ::= foo"), "grammar"),
    (dict(grammar="not a grammar"), "grammar"),
    (dict(choice=()), "choice"),
    (dict(choice=("a", 3)), "choice"),
    (dict(regex="a", choice=("b",)), "choice"),
    (dict(), "json"),
    (dict(json='{"type": "array", "uniqueItems": true}'), "json"),
    (dict(json='{"properties": {"a": {"not": {"type": "null"}}}}'), "json"),
    (dict(json='{"allOf": [{"type": "integer"}, {"minimum": 5}]}'), "json"),
    (dict(json='{"type": "string", "pattern": "^a+$", "maxLength": 3}'), "json"),
    (dict(json='{"anyOf": []}'), "json"),
    (dict(json='{"type": []}'), "json"),
])
def test_bad_specs_name_their_field(spec, field):
    with pytest.raises(StructuredOutputError) as e:
        grammar_of(S(**spec))
    assert e.value.field == field, e.value
    assert "/project/cpp" not in str(e.value)  # xgrammar's source location is cut


def test_what_the_backend_cannot_enforce_is_refused_not_ignored():
    with pytest.raises(StructuredOutputError, match=r"uniqueItems \(at #/properties/a\)"):
        grammar_of(S(json={"properties": {"a": {"type": "array", "uniqueItems": True}}}))
    # Property names and data are not keywords; oneOf runs as anyOf; one-element allOf is fine.
    grammar_of(S(json={"type": "object", "properties": {"not": {"type": "integer"}, "if": {"const": 1}},
                       "required": ["not"]}))
    grammar_of(S(json={"oneOf": [{"type": "integer"}, {"type": "string"}], "default": {"not": 1}}))
    grammar_of(S(json={"allOf": [{"type": "integer"}]}))


def test_specs_are_hashable_keys():
    a = S(json={"type": "object", "properties": {"b": {"type": "integer"}}})
    assert a.json == '{"type": "object", "properties": {"b": {"type": "integer"}}}'
    assert a.key == S(json=a.json).key != S(json=a.json, disable_any_whitespace=True).key
    assert S(choice=["x", "y"]).choice == ("x", "y")
    with pytest.raises(ValueError, match="structured_outputs"):
        SamplingParams(structured_outputs={"json": "{}"})  # type: ignore[arg-type]


def test_bounded_strings_become_patterns_but_data_does_not():
    schema = {"type": "object", "properties": {
        "s": {"type": "string", "minLength": 2, "maxLength": 5},
        "t": {"type": "string", "maxLength": 3, "pattern": "^a+$"},
        "u": {"type": "array", "items": {"type": "string", "minLength": 1}},
        "v": {"const": {"type": "string", "maxLength": 1}}}}
    out = _bounded_strings_as_patterns(schema)["properties"]
    assert out["s"] == {"type": "string", "pattern": "^.{2,5}$"}
    assert out["t"] == schema["properties"]["t"]  # a pattern of its own is kept as it is
    assert out["u"]["items"] == {"type": "string", "pattern": "^.{1,}$"}
    assert out["v"] == schema["properties"]["v"]


# -- the mask in the sampler --------------------------------------------------------------------
def test_mask_matches_xgrammar_kernel_and_leaves_other_rows():
    import xgrammar as xgr

    g = torch.Generator().manual_seed(0)
    B, V = 5, 1000
    words = (V + 31) // 32
    bitmask = torch.randint(-2**31, 2**31 - 1, (3, words), dtype=torch.int32, generator=g)
    logits = torch.randn(B, V, generator=g)
    rows = (0, 2, 4)
    got = apply_token_mask(logits.clone(), TokenMask(rows=rows, bitmask=bitmask))
    want = logits.clone()
    full = torch.full((B, words), -1, dtype=torch.int32)
    full[list(rows)] = bitmask
    xgr.apply_token_bitmask_inplace(want, full)
    assert torch.equal(got, want)
    assert torch.equal(got[[1, 3]], logits[[1, 3]])


def test_sampler_masks_before_temperature_and_reports_raw_logprobs():
    V = 64
    logits = torch.zeros(2, V)
    logits[:, 7] = 5.0  # the likeliest token is disallowed
    bitmask = torch.zeros(2, 2, dtype=torch.int32)
    bitmask[:, 0] = (1 << 3) | (1 << 9)  # tokens 3 and 9 only
    params = [SamplingParams(temperature=0), SamplingParams(temperature=2.0, seed=1)]
    gens = [None, params[1].make_generator("cpu")]
    for _ in range(20):
        out = Sampler()(logits, params, gens, token_mask=TokenMask(rows=(0, 1), bitmask=bitmask))
        assert set(out.token_ids.tolist()) <= {3, 9}
        want = torch.log_softmax(logits, -1)[0, out.token_ids[0]]  # the unmasked distribution's
        assert out.logprobs[0].item() == pytest.approx(want.item())


# -- the engine ---------------------------------------------------------------------------------
def validate_all(results, schemas, min_stop_fraction: float) -> None:
    """Every output that ended on its own parses and validates; only max_tokens cuts one short."""
    stopped = 0
    for r, schema in zip(results, schemas, strict=True):
        assert r.finish_reason in ("stop", "length"), (r.finish_reason, r.error)
        if r.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(r.text), schema)
    assert stopped >= min_stop_fraction * len(results)


# 4 batches of 16 schemas keep this under 30 s; raise it for a longer search.
@settings(max_examples=int(os.environ.get("NEXTSERVE_STRUCTURED_EXAMPLES", "4")), deadline=None,
          database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                HealthCheck.too_slow, HealthCheck.data_too_large])
@given(schemas=st.lists(TOP_SCHEMAS, min_size=16, max_size=16), compact=st.booleans())
def test_fuzzed_json_schemas_always_validate(engine, prompt, schemas, compact):
    params = [sampled(S(json=s, disable_any_whitespace=compact), seed=i) for i, s in enumerate(schemas)]
    results = engine.generate([prompt] * len(schemas), params)
    validate_all(results, schemas, min_stop_fraction=0.75)


def test_json_object_regex_choice_and_grammar(engine, prompt):
    specs = [S(json_object=True), S(json_object=True, disable_any_whitespace=True),
             S(regex=r"[a-c]{2,4}-\d\d"), S(choice=("yes", "no", 'say "maybe"\n')),
             S(grammar='root ::= "(" [0-9]+ ("," [0-9]+)* ")"')]
    n = 4
    results = engine.generate([prompt] * (len(specs) * n),
                              [sampled(s, seed=i) for i, s in enumerate(specs * n)])
    stopped = 0
    for r, spec in zip(results, specs * n, strict=True):
        # A random model may write a JSON string longer than max_tokens: "length", unchecked.
        assert r.finish_reason == "stop" or (spec.json_object and r.finish_reason == "length"), (spec, r)
        stopped += r.finish_reason == "stop"
        if r.finish_reason == "length":
            continue
        if spec.json_object:
            assert isinstance(json.loads(r.text), dict)
        elif spec.regex:
            assert re.fullmatch(spec.regex, r.text), r.text
        elif spec.choice:
            assert r.text in spec.choice
        else:
            assert re.fullmatch(r"\([0-9]+(,[0-9]+)*\)", r.text), r.text
    assert stopped >= 0.75 * len(results)


def test_json_wrapped_in_text_for_tool_calls(engine, prompt):
    """json_ebnf: a tool call in Qwen's form, one of two tools, as the tools helper may ask."""
    tools = [{"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": {
                 "type": "object", "properties": {"city": {"type": "string", "maxLength": 6}},
                 "required": ["city"]}}, "required": ["name", "arguments"]},
             {"type": "object", "properties": {"name": {"const": "add"}, "arguments": {
                 "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                 "required": ["a", "b"]}}, "required": ["name", "arguments"]}]
    grammar = json_ebnf(tools, prefix="<tool_call>\n", suffix="\n</tool_call>", any_whitespace=False)
    n = 6
    results = engine.generate([prompt] * n, [sampled(S(grammar=grammar), seed=i) for i in range(n)])
    for r in results:
        assert r.finish_reason == "stop", r
        assert r.text.startswith("<tool_call>\n") and r.text.endswith("\n</tool_call>"), r.text
        call = json.loads(r.text.removeprefix("<tool_call>\n").removesuffix("\n</tool_call>"))
        schema = tools[0] if call["name"] == "get_weather" else tools[1]
        jsonschema.validate(call, schema)
    with pytest.raises(StructuredOutputError):
        json_ebnf([{"type": "array", "uniqueItems": True}])


def test_eos_only_where_the_grammar_may_end(engine, prompt):
    """A grammar with no end (an endless list) never samples EOS: max_tokens cuts it, "length";
    with ignore_eos, a finished grammar leaves only EOS to sample until max_tokens."""
    endless = S(grammar='root ::= "1," root')
    (r,) = engine.generate([prompt], [sampled(endless, seed=0, max_tokens=12)])
    assert r.finish_reason == "length" and len(r.token_ids) == 12
    assert not set(r.token_ids) & engine.eos_token_ids
    done = SamplingParams(temperature=1.0, seed=0, max_tokens=6, ignore_eos=True,
                          structured_outputs=S(choice=("ok",)))
    (r,) = engine.generate([prompt], [done])
    assert r.finish_reason == "length" and r.text == "ok"
    assert set(r.token_ids[-3:]) <= engine.eos_token_ids


def test_grammars_are_compiled_once_and_evicted_lru(tiny_dir, prompt):
    engine = build_engine(tiny_dir, num_slots=2)
    spec = S(regex="[xy]{3}")
    for seed in range(3):
        (r,) = engine.generate([prompt], [sampled(spec, seed)])
        assert re.fullmatch("[xy]{3}", r.text)
    manager = engine.structured
    assert manager.num_compiled == 1
    manager.cache_size = 2
    for spec in (S(regex="a"), S(regex="b"), S(regex="c")):
        manager.compile(spec)
    assert [k[1] for k in manager._cache] == ["b", "c"]


def test_a_slow_compile_holds_back_only_its_own_request(tiny_dir, prompt):
    """While one request's grammar compiles, the other requests keep stepping; then it runs."""
    engine = build_engine(tiny_dir, num_slots=4)
    engine.add_request("warm", prompt, sampled(S(regex="a"), 0, max_tokens=2))
    while engine.has_unfinished():
        engine.step()
    manager = engine.structured
    release = threading.Event()
    compile_ = manager.compile

    def slow(params):
        release.wait(10)
        return compile_(params)

    manager.compile = slow  # type: ignore[method-assign]
    engine.add_request("slow", prompt, sampled(S(regex="[0-9]{4}"), 1))
    engine.add_request("free", prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    free_tokens = sum(len(o.new_token_ids) for _ in range(8) for o in engine.step() if o.request_id == "free")
    assert free_tokens == 8 and "slow" in engine.unfinished_request_ids()
    release.set()
    out = []
    while engine.has_unfinished():
        out += [o for o in engine.step() if o.request_id == "slow"]
    assert out[-1].finish_reason == "stop"
    text = engine.tokenizer.decode([t for o in out for t in o.new_token_ids])
    assert re.fullmatch("[0-9]{4}", text)


def test_abort_while_compiling_and_a_failed_compile_fail_alone(tiny_dir, prompt):
    engine = build_engine(tiny_dir, num_slots=2)
    manager = engine._structured_manager("x")
    release = threading.Event()
    compile_ = manager.compile
    manager.compile = lambda p: (release.wait(10), compile_(p))[1]  # type: ignore[method-assign]
    engine.add_request("a", prompt, sampled(S(regex="z+"), 0))
    assert engine.abort_request("a") and not engine.has_unfinished()
    release.set()
    # A spec that slipped past the HTTP layer's check fails its own request, with the reason.
    manager.compile = compile_  # type: ignore[method-assign]
    engine.add_request("bad", prompt, sampled(S(json='{"type": "strin"}'), 0))
    engine.add_request("ok", prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    outs = {}
    deadline = time.monotonic() + 30
    while engine.has_unfinished() and time.monotonic() < deadline:
        for o in engine.step():
            outs.setdefault(o.request_id, []).append(o)
    assert outs["bad"][-1].finish_reason == "error" and "strin" in outs["bad"][-1].error
    assert outs["ok"][-1].finish_reason == "length"


def test_a_grammar_with_no_way_on_fails_its_request_alone(engine, prompt):
    """{"$ref": "#"} (root ::= root) parses and compiles but admits nothing: the request fails
    with the reason, its neighbour is untouched."""
    empty = sampled(S(json={"$ref": "#"}), 0)
    fine = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    bad, ok = engine.generate([prompt, prompt], [empty, fine])
    assert bad.finish_reason == "error" and "no valid continuation" in bad.error
    assert ok.finish_reason == "length" and len(ok.token_ids) == 3


def test_structured_outputs_need_a_tokenizer(tiny_dir):
    engine = LLMEngine(LocalExecutor(tiny_dir, num_slots=1, max_model_len=64))
    with pytest.raises(ValueError, match="tokenizer"):
        engine.add_request("a", [1, 2], sampled(S(regex="a"), 0))


def test_manager_masks_pad_ids_past_the_tokenizer(tiny_dir):
    """The model's vocab (512) is padded past the tokenizer's (483): those ids, and special
    tokens, are never allowed; EOS only at the grammar's end."""
    tok = Tokenizer(tiny_dir)
    eos = tok.eos_token_ids
    manager = StructuredOutputManager(tok, 512, eos)
    state = manager.new_state(manager.compile(S(choice=("a",))))
    mask, failed = manager.masks([None, state])
    assert not failed and mask.rows == (1,)
    logits = apply_token_mask(torch.zeros(2, 512), mask)
    allowed = (logits[1] == 0).nonzero().flatten().tolist()
    assert allowed and all(tok.decode([t]) and "a".startswith(tok.decode([t])) for t in allowed)
    assert state.accept(tok.encode("a", add_special_tokens=False)[0])
    mask, _ = manager.masks([state])
    allowed = (apply_token_mask(torch.zeros(1, 512), mask)[0] == 0).nonzero().flatten().tolist()
    assert set(allowed) == set(eos)


def test_through_the_engine_core_process(tiny_dir):
    """The sampler runs in the core: specs cross the pipe, the masks are built there."""
    from tests.engine.test_structured_output import build_engine as build

    client = EngineCoreClient(functools.partial(build, tiny_dir, 4))
    try:
        prompt = Tokenizer(tiny_dir).encode(PROMPT_TEXT)
        schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
                  "required": ["n", "ok"]}

        async def one(i: int) -> tuple[str, str | None]:
            text, reason = "", None
            async for o in client.generate(f"r{i}", prompt, sampled(S(json=schema), seed=i)):
                text += o.new_text
                reason = o.finish_reason
            return text, reason

        async def main():
            return await asyncio.gather(*(one(i) for i in range(4)))

        for text, reason in asyncio.run(main()):
            assert reason == "stop"
            jsonschema.validate(json.loads(text), schema)
    finally:
        client.shutdown()


def test_utf8_guard_refuses_what_utf8_forbids(tiny_dir):
    """xgrammar lets E0 80 80 (an overlong NUL) into a length-bounded string; the guard masks
    the byte after the lead, so bounded strings keep their length when decoded."""
    tok = Tokenizer(tiny_dir)
    manager = StructuredOutputManager(tok, 512, tok.eos_token_ids)
    state = manager.new_state(manager.compile(S(json='{"type": "string", "maxLength": 2}')))
    token_bytes = tokenizer_info(tok, 512, tok.eos_token_ids).decoded_vocab
    by_bytes = {b: t for t, b in enumerate(token_bytes) if b}
    assert state.accept(by_bytes[b'"']) and state.accept(by_bytes[b"\xe0"])
    mask, _ = manager.masks([state])
    allowed = (apply_token_mask(torch.zeros(1, 512), mask)[0] == 0).nonzero().flatten().tolist()
    firsts = {token_bytes[t][0] for t in allowed}
    assert firsts and firsts <= set(range(0xA0, 0xC0))  # E0 takes A0-BF next, nothing else
    state.matcher.rollback(1)  # as if E0 had not come: the plain mask allows 80-9F again
    state.lead = None
    assert state.accept(by_bytes[b"a"])
    mask, _ = manager.masks([state])
    allowed = (apply_token_mask(torch.zeros(1, 512), mask)[0] == 0).nonzero().flatten().tolist()
    assert by_bytes[b"\xe0"] in allowed


def test_the_mask_comes_after_logit_bias_and_penalties(engine, prompt):
    """A +100 bias on a token the grammar refuses, and penalties, cannot push it past the mask."""
    tok = engine.tokenizer
    x = tok.encode("x", add_special_tokens=False)[0]
    params = SamplingParams(temperature=1.0, seed=3, max_tokens=16, logit_bias=((x, 100.0),),
                            presence_penalty=1.5, repetition_penalty=1.3,
                            structured_outputs=S(regex="[0-9]{3}"))
    (r,) = engine.generate([prompt], [params])
    assert r.finish_reason == "stop" and re.fullmatch("[0-9]{3}", r.text)
