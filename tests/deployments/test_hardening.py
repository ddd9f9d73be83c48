"""Issue 11 over HTTP: no request can harm another, and nothing is accepted or refused silently.
Hostile requests (values that would overflow the engine's shared tensors, reserved template
variables, fields the server does not implement, huge bodies, batches that can never fit) each
get a 4xx naming what is wrong, while normal greedy requests sent at the same time get exactly
the tokens the engine gives them alone. Also: API and admin keys, the body limit, token ids up to
the model's vocab_size, and errors that carry a request id instead of exception text. One app
for the module, with keys set and a replica whose engine fails two magic prompts on purpose.

Starts Ray: run inside a loopback-only network namespace:
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest FILE'"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

ray = pytest.importorskip("ray")

from engine.async_engine import EngineStepError  # noqa: E402
from tests.serve_app import running_app  # noqa: E402

MODEL = "tiny"
MAX_MODEL_LEN = 64
MAX_NUM_SEQS = 4
MAX_QUEUED = 8  # so at most 12 prompts per request
MAX_BYTES = 256 << 10
API_KEY, ADMIN_KEY = "sk-test-key", "admin-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
TIMEOUT = 60
# Prompts the fault-injecting engine fails: as a bug in our code would, and as a failed step would.
BUG_PROMPT, STEP_FAILURE_PROMPT = [9, 9, 9, 1], [9, 9, 9, 2]
ENGINE_DEATH_PROMPT = [9, 9, 9, 3]  # after it the engine cannot step: the module's last test sends it
SECRET = "/home/secret/nextserve/engine.py at 10.1.2.3"
# The checkpoint's template uses one optional variable, so a request can break it with a bad type.
TEMPLATE = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] "
            "+ '<|im_end|>\\n' }}{%- endfor %}{%- if suffix is defined %}{{- suffix + '\\n' }}{%- endif %}"
            "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


class FaultyEngine:
    """The real engine, except for the two magic prompts."""

    def __init__(self, engine: Any) -> None:
        self.inner, self.dead = engine, False

    def healthy(self) -> bool:
        return not self.dead and self.inner.is_alive()

    async def generate(self, request_id: str, prompt: Any, params: Any) -> AsyncIterator[Any]:
        if list(prompt) == ENGINE_DEATH_PROMPT:
            self.dead = True
        if self.dead:
            raise EngineStepError("the engine thread has stopped")
        if list(prompt) == BUG_PROMPT:
            raise RuntimeError(f"boom in {SECRET}")
        if list(prompt) == STEP_FAILURE_PROMPT:
            raise EngineStepError(f"engine step failed: Overflow when unpacking long long in {SECRET}")
        async for out in self.inner.generate(request_id, prompt, params):
            yield out

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def faulty_engine(config: Any) -> tuple[Any, Any, int]:
    from deployments.engine_factory import build_engine

    engine, tokenizer, max_model_len = build_engine(config)
    return FaultyEngine(engine), tokenizer, max_model_len


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    d = make_tiny_model(tmp_path_factory.mktemp("hardening"), arch="qwen3_next")
    (d / "chat_template.jinja").write_text(TEMPLATE)
    return d


@pytest.fixture(scope="module")
def base_url(tiny_dir):
    args = dict(model=str(tiny_dir), dtype="float32", executor="local",
                engine=dict(max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN,
                            max_num_batched_tokens=128),
                serve=dict(served_model_name=MODEL, max_queued_requests=MAX_QUEUED, retry_after_s=1,
                           torch_threads=1, max_request_bytes=MAX_BYTES, api_key=API_KEY,
                           admin_api_key=ADMIN_KEY, rebalance_cooldown_s=600))
    with running_app(args, num_cpus=2, engine_factory=faulty_engine) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=API_KEY, timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def offline(tiny_dir):
    """The engine alone, one request at a time: what every normal answer must equal."""
    from engine.llm_engine import LLMEngine
    from engine.local_executor import LocalExecutor
    from engine.sampling import SamplingParams
    from engine.tokenizer import Tokenizer

    engine = LLMEngine(LocalExecutor(tiny_dir, num_slots=1, max_model_len=MAX_MODEL_LEN),
                       tokenizer=Tokenizer(tiny_dir))

    def run(prompt_ids: list[int], max_tokens: int) -> list[int]:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        (c,) = engine.generate([prompt_ids], params)
        return list(c.token_ids)
    return run


def post(base_url: str, route: str, body: Any, headers: dict | None = None, **kw: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return requests.post(f"{base_url}{route}", data=data, timeout=TIMEOUT,
                         headers={"Content-Type": "application/json", **AUTH, **(headers or {})}, **kw)


NORMAL = [[3 + i, 17, 40 + i, 8] for i in range(4)]


def normal(base_url: str, i: int) -> list[int]:
    r = post(base_url, "/v1/completions", {"model": MODEL, "prompt": NORMAL[i], "max_tokens": 12,
                                           "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


def beside_normal_requests(base_url: str, offline, hostile) -> list[Any]:
    """Run `hostile()` while four normal greedy requests are in flight; their tokens must be
    exactly those of the engine alone."""
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(normal, base_url, i) for i in range(4)]
        result = hostile()
        got = [f.result(TIMEOUT) for f in futures]
    for i in range(4):
        assert got[i] == offline(NORMAL[i], 12), i
    return result


def error(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, r.text[:500]
    body = r.json()["error"]
    assert set(body) == {"message", "type", "param", "code"}
    return body


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
# (route, body, the field the 400 must name, words its message must hold)
BAD_VALUES = [
    (CMPL, {"prompt": [3, 4], "top_k": 9223372036854775808, "temperature": 1}, None, None),
    (CMPL, {"prompt": [3, 4], "seed": 2**64, "temperature": 1}, "seed", "18446744073709551616"),
    (CMPL, {"prompt": [3, 4], "seed": -(2**63) - 1}, "seed", "seed"),
    (CMPL, {"prompt": [3, 4], "stop_token_ids": [512]}, "stop_token_ids", "512"),
    (CMPL, {"prompt": [3, 4], "stop_token_ids": [5] * 1025}, "stop_token_ids", "stop_token_ids"),
    (CMPL, {"prompt": [3, 4], "logprobs": 21}, "logprobs", "21"),
    (CMPL, {"prompt": [3, 4], "temperature": 1e300}, "temperature", "float32"),
    (CHAT, {"messages": MSG, "logprobs": True, "top_logprobs": 10**12}, "top_logprobs", "top_logprobs"),
    (CMPL, {"prompt": "hi", "stop": ["x"] * 17}, "stop", "at most 16 stop strings"),
    (CMPL, {"prompt": "hi", "stop": "y" * 257}, "stop", "at most 256 characters"),
    (CMPL, {"prompt": "a" * 10_000}, "prompt", "cannot fit"),
    (CMPL, {"prompt": [[3]] * 13}, "prompt", "serve.max_prompts_per_request"),
    (CMPL, {"prompt": ["x"] * 5000}, "prompt", "at most 12"),
    (CMPL, {"prompt": [3, 513]}, "prompt", "513"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"messages": 1}}, "chat_template_kwargs", "'messages'"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"template": 1}}, "chat_template_kwargs", "'template'"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"bos_token": "x"}}, "chat_template_kwargs", "bos_"),
    (CHAT, {"messages": MSG, "chat_template_kwargs": {"suffix": 3}}, "messages", "chat template"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages", "image_url"),
]


@pytest.mark.parametrize("route,body,param,words", BAD_VALUES, ids=range(len(BAD_VALUES)))
def test_bad_values_get_400_and_harm_no_one(base_url, offline, route, body, param, words):
    def hostile():
        return [post(base_url, route, {"model": MODEL, "max_tokens": 4, **body, "stream": s})
                for s in (False, True)]

    for r in beside_normal_requests(base_url, offline, hostile):
        if param is None:  # top_k past the vocabulary means every token: not an error
            assert r.status_code == 200, r.text
            continue
        e = error(r, 400)
        assert e["param"] == param and words in e["message"], e
    assert requests.get(f"{base_url}/health", timeout=10).status_code == 200


def test_extreme_but_valid_values_run(base_url, offline):
    bodies = [{"top_k": 2**62, "temperature": 1, "seed": 2**64 - 1}, {"seed": -(2**63), "temperature": 0.7},
              {"temperature": 1e-300, "top_p": 1e-300}, {"temperature": 3e38},
              {"top_k": 512, "temperature": 1}, {"stop": ["z" * 256] * 16},
              {"stop_token_ids": [511], "ignore_eos": True},
              {"repetition_penalty": 3.4e38, "temperature": 1, "presence_penalty": -2,
               "frequency_penalty": 2},
              {"repetition_penalty": 1e-30, "min_p": 1, "temperature": 1e-300},
              {"logit_bias": {str(t): -100 for t in range(512)}, "min_tokens": 4, "temperature": 1},
              {"logit_bias": {"511": 100, "0": -100}, "min_tokens": 4, "stop_token_ids": [511], "n": 2}]

    def hostile():
        return [post(base_url, CMPL, {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 4, **b})
                for b in bodies]

    for r in beside_normal_requests(base_url, offline, hostile):
        assert r.status_code == 200, r.text


UNSUPPORTED = [
    (CMPL, "best_of", 2), (CMPL, "suffix", "end"), (CMPL, "use_beam_search", True),
    (CMPL, "length_penalty", 2), (CMPL, "tools", [{"type": "function"}]),
    (CMPL, "guided_whitespace_pattern", " "), (CMPL, "logits_processors", ["x"]),
    (CHAT, "guided_decoding_backend", "outlines"), (CHAT, "functions", [{"name": "f"}]),
    (CHAT, "include_stop_str_in_output", True), (CHAT, "continue_final_message", True),
]


@pytest.mark.parametrize("route,field,value", UNSUPPORTED, ids=[f for _, f, _ in UNSUPPORTED])
def test_unimplemented_fields_are_refused_by_name(base_url, route, field, value):
    prompt = {"prompt": "hi"} if route == CMPL else {"messages": MSG}
    body = {"model": MODEL, "max_tokens": 2, field: value, **prompt}
    e = error(post(base_url, route, body), 400)
    assert e["param"] == field and field in e["message"], e


def test_unknown_fields_are_refused_as_openai_does(base_url, client):
    e = error(post(base_url, CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 2, "frobnicate": 1}), 400)
    assert e["message"] == "Unrecognized request argument supplied: frobnicate" and e["param"] == "frobnicate"
    odd = [{"role": "user", "content": "x", "mood": 1}]
    e = error(post(base_url, CHAT, {"model": MODEL, "messages": odd}), 400)
    assert "messages.0.mood" in e["message"]
    with pytest.raises(openai.BadRequestError) as ex:
        client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, logit_bias={"512": 3})
    assert ex.value.body["param"] == "logit_bias"  # the model has 512 token ids


def test_neutral_values_and_no_effect_fields_are_accepted(client, offline):
    r = client.completions.create(
        model=MODEL, prompt=NORMAL[0], max_tokens=12, temperature=0, presence_penalty=0, frequency_penalty=0,
        logit_bias={}, user="someone", best_of=1,
        extra_body={"ignore_eos": True, "return_token_ids": True, "repetition_penalty": 1, "min_p": 0,
                    "metadata": {"k": "v"}, "skip_special_tokens": True})
    assert r.choices[0].model_extra["token_ids"] == offline(NORMAL[0], 12)
    chat = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=3, temperature=0,
                                          response_format={"type": "text"}, tool_choice="none", store=False,
                                          parallel_tool_calls=True)
    assert chat.choices[0].finish_reason in ("length", "stop")


def test_null_means_not_set(base_url, offline):
    body = {"model": MODEL, "prompt": NORMAL[1], "max_tokens": 12, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "n": None, "stream": None, "top_p": None, "top_k": None, "echo": None,
            "logprobs": None, "stop": None, "seed": None, "presence_penalty": None, "logit_bias": None}
    r = post(base_url, CMPL, body)
    assert r.status_code == 200 and r.json()["choices"][0]["token_ids"] == offline(NORMAL[1], 12), r.text
    chat = {"model": MODEL, "messages": MSG, "max_tokens": 2, "logprobs": None, "top_logprobs": None,
            "temperature": None, "tools": None, "response_format": None, "stream_options": None}
    assert post(base_url, CHAT, chat).status_code == 200
    assert error(post(base_url, CMPL, {"model": None, "prompt": "x"}), 400)["param"] == "model"


def test_template_variables_from_the_request_work(client):
    ok = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, temperature=0,
                                        extra_body={"chat_template_kwargs": {"suffix": "be brief"},
                                                    "return_token_ids": True})
    plain = client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, temperature=0,
                                           extra_body={"return_token_ids": True})
    assert len(ok.model_extra["prompt_token_ids"]) > len(plain.model_extra["prompt_token_ids"])


def test_token_ids_up_to_the_models_vocab_size(base_url, client):
    """The tiny tokenizer has 483 ids, the model 512 embedding rows: 483..511 are valid prompt
    ids (as vLLM and `nextserve generate` take them) and decode to ""."""
    for prompt in ([3, 483, 511], [511], [[500, 4], [5, 490]]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True,
                                      logprobs=1, extra_body={"ignore_eos": True})
        assert [c.finish_reason for c in r.choices] == ["length"] * (2 if isinstance(prompt[0], list) else 1)
    e = error(post(base_url, CMPL, {"model": MODEL, "prompt": [3, 512]}), 400)
    assert "512" in e["message"] and "0..511" in e["message"]


def test_api_key(base_url, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY},
                    {"Authorization": f"Basic {API_KEY}"}):
        r = requests.post(f"{base_url}{CMPL}", json={"model": MODEL, "prompt": "hi", "max_tokens": 1},
                          headers=headers, timeout=10)
        assert error(r, 401)["type"] == "AuthenticationError" and r.headers["WWW-Authenticate"] == "Bearer"
    for path in ("/v1/models", "/stats", "/metrics", "/expert_load", "/dashboard", "/nowhere"):
        assert requests.get(f"{base_url}{path}", timeout=10).status_code == 401, path
    assert requests.get(f"{base_url}/health", timeout=10).status_code == 200  # probes need no key
    metrics = requests.get(f"{base_url}/metrics", headers=AUTH, timeout=10)
    assert metrics.status_code == 200
    # Refused before the routes, yet counted: an operator sees who knocks without the key.
    assert 'nextserve_request_errors_total{kind="unauthorized"}' in metrics.text, metrics.text[:2000]
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0).models.list()
    assert client.models.list().data[0].id == MODEL


def test_rebalance_needs_the_admin_key_and_cools_down(base_url):
    url = f"{base_url}/rebalance"
    assert error(requests.post(url, timeout=10), 401)["type"] == "AuthenticationError"
    assert requests.post(url, headers=AUTH, timeout=10).status_code == 401  # the API key is not enough
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    first = requests.post(url, headers=admin, timeout=10)
    assert error(first, 400)["message"].startswith("expert rebalancing needs the cluster executor")
    again = requests.post(url, headers=admin, timeout=10)
    assert "rebalance_cooldown_s" in error(again, 429)["message"] and int(again.headers["Retry-After"]) > 500


def test_body_limit(base_url, offline):
    big = json.dumps({"model": MODEL, "prompt": "a" * (MAX_BYTES + 10)}).encode()

    def chunks():  # no Content-Length: the server counts what arrives
        for i in range(0, len(big), 16384):
            yield big[i:i + 16384]

    def hostile():
        start = time.monotonic()
        declared = post(base_url, CMPL, big)
        streamed = requests.post(f"{base_url}{CMPL}", data=chunks(), timeout=TIMEOUT,
                                 headers={"Content-Type": "application/json", **AUTH})
        huge = post(base_url, CMPL, b"[" + b"1," * (32 << 20) + b"1]")  # 64 MiB
        return declared, streamed, huge, time.monotonic() - start

    declared, streamed, huge, seconds = beside_normal_requests(base_url, offline, hostile)
    for r in (declared, streamed, huge):
        assert str(MAX_BYTES) in error(r, 413)["message"]
    assert seconds < 30
    assert requests.get(f"{base_url}/health", timeout=10).status_code == 200


def test_errors_carry_a_request_id_not_exception_text(base_url, offline):
    def hostile():
        return [post(base_url, CMPL, {"model": MODEL, "prompt": p, "max_tokens": 2, "stream": s})
                for p in (BUG_PROMPT, STEP_FAILURE_PROMPT) for s in (False, True)]

    bug, bug_stream, step, step_stream = beside_normal_requests(base_url, offline, hostile)
    for r, status in ((bug, 500), (bug_stream, 500), (step, 503), (step_stream, 503)):
        e = error(r, status)
        request_id = r.headers["X-Request-Id"]  # Serve's id of the request, which its logs carry too
        assert request_id and f"(request id {request_id})" in e["message"]
        for leak in ("secret", "10.1.2.3", "boom", "Overflow", "RuntimeError", "Traceback"):
            assert leak not in r.text, r.text
    assert_logged(request_id)


def assert_logged(request_id: str, timeout_s: float = 20) -> None:
    """The replica's log has the line with the details under the same id."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for f in logs.rglob("*"):
            if f.is_file() and f.suffix in (".log", ".err", ".out"):
                text = f.read_text(errors="replace")
                if request_id in text:
                    assert "Overflow" in text[text.index(request_id):][:2000]
                    return
        time.sleep(0.5)
    raise AssertionError(f"{request_id} not in the replica's logs under {logs}")


def test_health_fails_once_the_engine_cannot_step(base_url):
    """Last in the module: Serve replaces a replica whose health check fails."""
    assert requests.get(f"{base_url}/health", timeout=10).status_code == 200
    error(post(base_url, CMPL, {"model": MODEL, "prompt": ENGINE_DEATH_PROMPT, "max_tokens": 2}), 503)
    r = requests.get(f"{base_url}/health", timeout=10)
    assert error(r, 503)["message"] == "the engine cannot run requests" and r.headers["Retry-After"]
