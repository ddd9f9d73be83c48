"""Structured outputs over HTTP with the official `openai` client, through the engine-core process
(the local executor's default): response_format json_schema (also openai's `parse` helper with a
pydantic model) and json_object, vLLM's structured_outputs {json, regex, choice, grammar} and the
older guided_* fields, streaming or not; every output of the random-weight tiny model, sampled at
temperature 1, parses and validates. A bad schema, regex or grammar, or two specs at once, gets
a 400 naming the field. One app for the module (starting Ray and Serve takes ~20 s).

Starts Ray: run inside a loopback-only network namespace:
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest FILE'"""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

ray = pytest.importorskip("ray")

from tests.serve_app import running_app  # noqa: E402

MODEL = "tiny"
TIMEOUT = 60
MESSAGES = [{"role": "user", "content": "Describe a person in JSON."}]
PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "married": {"type": "boolean"}},
    "required": ["name", "age", "tags", "married"], "additionalProperties": False}
JSON_SCHEMA = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}


class Person(BaseModel):
    name: str = Field(max_length=8)
    age: int = Field(ge=0, le=120)
    married: bool


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("structured_api"), arch="qwen3_next")


@pytest.fixture(scope="module")
def client(tiny_dir):
    args = dict(model=str(tiny_dir), dtype="float32", executor="local",
                engine=dict(max_num_seqs=8, max_model_len=512, max_num_batched_tokens=256),
                serve=dict(served_model_name=MODEL, torch_threads=1))
    with running_app(args, num_cpus=2) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


def chat(client, seed: int, **kw):
    return client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=1.0, seed=seed,
                                          max_tokens=300, **kw)


def test_chat_json_schema_validates(client):
    for seed in range(4):
        r = chat(client, seed, response_format=JSON_SCHEMA)
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)


def test_every_choice_of_n_validates_with_penalties(client):
    r = chat(client, 11, response_format=JSON_SCHEMA, n=3, presence_penalty=1.0, frequency_penalty=0.5)
    assert len(r.choices) == 3
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)


def test_chat_json_schema_streamed(client):
    stream = chat(client, 7, response_format=JSON_SCHEMA, stream=True)
    text, reasons = "", []
    for chunk in stream:
        for c in chunk.choices:
            text += c.delta.content or ""
            reasons.append(c.finish_reason)
    assert reasons[-1] == "stop"
    jsonschema.validate(json.loads(text), PERSON)


def test_openai_parse_helper_with_a_pydantic_model(client):
    """openai's own helper sends a strict json_schema made from the model and parses the answer."""
    r = client.chat.completions.parse(model=MODEL, messages=MESSAGES, temperature=1.0, seed=3,
                                      max_tokens=300, response_format=Person)
    assert isinstance(r.choices[0].message.parsed, Person)


def test_json_object_and_vllm_options(client):
    r = chat(client, 1, response_format={"type": "json_object"}, max_completion_tokens=400)
    if r.choices[0].finish_reason == "stop":  # a random model may write a string past max_tokens
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    for seed in range(2):
        r = client.completions.create(model=MODEL, prompt="Date:", temperature=1.0, seed=seed, max_tokens=32,
                                      extra_body={"structured_outputs": {"regex": r"20\d\d-[01]\d-[0-3]\d"}})
        assert r.choices[0].finish_reason == "stop"
        assert re.fullmatch(r"20\d\d-[01]\d-[0-3]\d", r.choices[0].text)
    r = chat(client, 2, extra_body={"structured_outputs": {"choice": ["positive", "negative"]}})
    assert r.choices[0].message.content in ("positive", "negative")
    r = chat(client, 3, extra_body={"structured_outputs": {"grammar": 'root ::= "(" [a-z]+ ")"'}})
    assert re.fullmatch(r"\([a-z]+\)", r.choices[0].message.content)
    r = chat(client, 4, extra_body={"guided_json": PERSON})  # vLLM < 0.10's field
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    r = client.completions.create(model=MODEL, prompt=["a", "b"], temperature=1.0, seed=5, max_tokens=16,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert {c.text for c in r.choices} <= {"yes", "no"}


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format"),
    ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs.choice"),
    ({"structured_outputs": {"structural_tag": "{}"}}, "structured_outputs"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_regex": "a", "response_format": {"type": "json_object"}}, "guided_regex"),
    ({"guided_decoding_backend": "outlines"}, "guided_decoding_backend"),
])
def test_bad_specs_are_400s_naming_the_field(client, body, param):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, extra_body=body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param, e.value.body
    assert param.split(".")[0] in e.value.body["message"]
