"""The HTTP API under hostile input and overload: hand-written malformed requests, a property-based
fuzz of both routes (hypothesis), and a bounded flood over loopback. No request may get a 500 or
go unanswered, and the replica stays alive throughout. One Serve app for the module (~15 s).

Starts Ray: run inside a loopback-only network namespace:
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest FILE'
with FILE tests/deployments/test_robustness.py."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

ray = pytest.importorskip("ray")

from tests.serve_app import running_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
MAX_MODEL_LEN = 64
MAX_NUM_SEQS = 4
MAX_QUEUED = 8
TIMEOUT = 60
# 503 would mean an engine step failed: no single request, however hostile, may do that.
OK_STATUSES = {200, 400, 404, 405, 413, 415, 422, 429}


@pytest.fixture(scope="module")
def base_url(tmp_path_factory):
    from model.tiny import make_tiny_model

    tiny_dir = make_tiny_model(tmp_path_factory.mktemp("robust"), arch="qwen3_next")
    args = dict(model=str(tiny_dir), dtype="float32", executor="local",
                engine=dict(max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN,
                            max_num_batched_tokens=128),
                serve=dict(served_model_name=MODEL, max_queued_requests=MAX_QUEUED, retry_after_s=1,
                           torch_threads=1))
    with running_app(args, num_cpus=2) as url:
        yield url


def post(base_url: str, route: str, body: bytes | dict | list, **headers: str) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body, allow_nan=True).encode()
    return requests.post(f"{base_url}{route}", data=data, timeout=TIMEOUT,
                         headers={"Content-Type": "application/json", **headers})


SERVED = [0]  # requests answered 200; a restarted replica would count fewer finished ones


def check(r: requests.Response, what: object) -> None:
    """An answer every client can act on: a success, or an error status with OpenAI's JSON body."""
    assert r.status_code in OK_STATUSES, f"{what!r:.300}: {r.status_code} {r.text[:300]}"
    SERVED[0] += r.status_code == 200
    if r.status_code != 200:
        assert "error" in r.json(), r.text[:300]
    if r.status_code in (429, 503):
        assert r.headers.get("Retry-After"), r.headers


def assert_alive(base_url: str) -> None:
    assert requests.get(f"{base_url}/health", timeout=10).status_code == 200
    r = post(base_url, "/v1/completions", {"model": MODEL, "prompt": [5, 6], "max_tokens": 2})
    assert r.status_code == 200, r.text


CMPL, CHAT = "/v1/completions", "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
HOSTILE = [
    (CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 10**12}),
    (CMPL, {"model": MODEL, "prompt": "hi", "max_tokens": 2**70}),
    (CMPL, {"model": MODEL, "prompt": "hi", "n": 10**9}),
    (CHAT, {"model": MODEL, "messages": MSG, "max_tokens": 10**12}),
    (CHAT, {"model": MODEL, "messages": MSG, "n": 10**9}),
    (CMPL, {"model": MODEL, "prompt": [10**6, 3]}),
    (CMPL, {"model": MODEL, "prompt": [-1, 3]}),
    (CMPL, {"model": MODEL, "prompt": [2**70]}),
    (CMPL, {"model": MODEL, "prompt": [[3, 4], [2**40]]}),
    (CMPL, {"model": MODEL, "prompt": [10**6], "echo": True, "logprobs": 2, "max_tokens": 0}),
    (CMPL, {"model": MODEL, "prompt": [3, 4], "stop_token_ids": [10**9, -5]}),
    (CMPL, {"model": MODEL, "prompt": [3, 4], "seed": 2**80, "max_tokens": 2}),
    (CMPL, {"model": MODEL, "prompt": [3, 4], "seed": -(2**70), "max_tokens": 2}),
    (CMPL, {"model": MODEL, "prompt": [3, 4], "temperature": float("inf"), "max_tokens": 2}),
    (CMPL, {"model": MODEL, "prompt": [3, 4], "temperature": float("nan"), "max_tokens": 2}),
    (CMPL, {"model": MODEL, "prompt": [3, 4], "top_k": 2**62, "max_tokens": 2}),
    (CMPL, {"model": MODEL, "prompt": [3, 4], "top_p": 1e-300, "temperature": 1e-300, "max_tokens": 2}),
    (CMPL, {"model": MODEL, "prompt": ["a" * 100_000]}),
    (CMPL, {"model": MODEL, "prompt": [[]]}),
    (CMPL, {"model": MODEL, "prompt": "hi", "stop": [""]}),
    (CMPL, {"model": MODEL, "prompt": "\ud800 lone surrogate"}),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
    (CHAT, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image"}, 3]}]}),
    (CHAT, {"model": MODEL, "messages": MSG, "chat_template_kwargs": {"a": []}}),
    (CHAT, {"model": MODEL, "messages": [{"role": "nobody", "content": None}]}),
    (CMPL, {"model": [MODEL], "prompt": "hi"}),
    (CMPL, {"model": MODEL, "prompt": {"a": 1}}),
    (CMPL, {"model": MODEL, "prompt": "hi", "stream": "yes"}),
    (CMPL, {"model": MODEL, "prompt": "hi", "stream_options": 3}),
    (CMPL, []),
    (CMPL, "just a string"),
]


@pytest.mark.parametrize("route,body", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_request_gets_a_clear_answer(base_url, route, body):
    for stream in (False, True):
        b = {**body, "stream": stream} if isinstance(body, dict) and "stream" not in body else body
        check(post(base_url, route, b), b)


def test_malformed_bodies(base_url):
    deep = b"[" * 100_000 + b"]" * 100_000
    nested = b'{"model": "tiny", "prompt": ' + b"[" * 5000 + b"1" + b"]" * 5000 + b"}"
    for body in (deep, nested, b'{"model": "tiny", "prompt": "\xff\xfe\xfa"}', b"\xff" * 64, b"",
                 b"{", b'{"model": "tiny", "prompt": "hi"', b"null", b"1e999999"):
        for route in (CMPL, CHAT):
            check(post(base_url, route, body), body[:40])
    plain = {"Content-Type": "text/plain"}
    check(post(base_url, CMPL, b'{"model": "tiny", "prompt": "hi"}', **plain), "text/plain")
    assert_alive(base_url)


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                 max_size=4),
                    max_leaves=10)


def field(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly a plausible value, sometimes any JSON at all."""
    return st.one_of(valid, valid, JSON)


TOKEN_IDS = st.lists(st.integers(-3, 600), min_size=0, max_size=6)
SAMPLING = dict(
    model=field(st.sampled_from([MODEL, "other"])),
    max_tokens=field(st.integers(-2, 6) | st.integers(0, 2**64)),
    temperature=field(st.sampled_from([0, 0.5, 1, 2.5, -1])),
    top_p=field(st.floats(0, 1.5)), top_k=field(st.integers(-3, 1000)),
    n=field(st.integers(0, 3) | st.integers(0, 10**12)), seed=field(st.integers(-(2**65), 2**65)),
    stop=field(st.text(max_size=3) | st.lists(st.text(max_size=3), max_size=3)),
    stop_token_ids=field(TOKEN_IDS), ignore_eos=field(st.booleans()), stream=field(st.booleans()),
    return_token_ids=field(st.booleans()),
)
COMPLETION = st.fixed_dictionaries({}, optional=dict(
    SAMPLING, prompt=field(st.text(max_size=30) | TOKEN_IDS | st.lists(TOKEN_IDS, max_size=3)
                           | st.lists(st.text(max_size=10), max_size=3)),
    logprobs=field(st.integers(-1, 25)), echo=field(st.booleans())))
MESSAGE = st.fixed_dictionaries({"role": field(st.sampled_from(["system", "user", "assistant", "tool"]))},
                                optional={"content": field(st.text(max_size=30) | st.lists(
                                    st.fixed_dictionaries({"type": st.just("text"), "text": st.text()})))})
CHAT_BODY = st.fixed_dictionaries({}, optional=dict(
    SAMPLING, messages=field(st.lists(MESSAGE, max_size=3)), logprobs=field(st.booleans()),
    top_logprobs=field(st.integers(-1, 25)), max_completion_tokens=field(st.integers(-1, 6)),
    add_generation_prompt=field(st.booleans())))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.one_of(st.tuples(st.just(CMPL), COMPLETION), st.tuples(st.just(CHAT), CHAT_BODY)))
def test_fuzz_no_server_error(base_url, data):
    route, body = data
    if body.get("model", MODEL) == MODEL and isinstance(body.get("max_tokens"), int) \
            and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # keep accepted requests short; huge values are tried above
    check(post(base_url, route, body), body)


def test_replica_alive_after_fuzz(base_url):
    assert_alive(base_url)
    s = requests.get(f"{base_url}/stats", timeout=10).json()
    assert s["num_running"] == 0 and s["num_waiting"] == 0
    assert s["num_finished"] >= SERVED[0] > 0, "the replica was restarted: it lost its counters"


FLOOD = 96  # requests at once, far over the replica's MAX_NUM_SEQS + MAX_QUEUED


def flood_one(base_url: str, i: int) -> tuple[int, int, str | None]:
    """(status, tokens received, Retry-After); streams are read to the end."""
    body = {"model": MODEL, "prompt": [3 + i % 50, 7], "max_tokens": 6, "ignore_eos": True,
            "stream": i % 2 == 0, "return_token_ids": True}
    with requests.post(f"{base_url}{CMPL}", json=body, timeout=TIMEOUT, stream=True) as r:
        if r.status_code != 200:
            return r.status_code, 0, r.headers.get("Retry-After")
        if not body["stream"]:
            return 200, len(r.json()["choices"][0]["token_ids"]), None
        tokens, done, errors = 0, False, 0
        for line in r.iter_lines():
            if line == b"data: [DONE]":
                done = True
            elif line.startswith(b"data: "):
                event = json.loads(line[6:])
                errors += "error" in event
                tokens += sum(len(c.get("token_ids") or ()) for c in event.get("choices", ()))
        assert done, f"stream {i} ended without [DONE]"
        return (503 if errors else 200), tokens, "stream"


def test_flood_every_request_answered(base_url):
    start = time.monotonic()
    with ThreadPoolExecutor(FLOOD) as pool:
        results = list(pool.map(lambda i: flood_one(base_url, i), range(FLOOD)))
    elapsed = time.monotonic() - start
    served = [n for s, n, _ in results if s == 200]
    refused = [(s, h) for s, _, h in results if s != 200]
    print(f"\n[flood] {FLOOD} requests in {elapsed:.1f}s: {len(served)} served, {len(refused)} refused "
          f"({sorted({s for s, _ in refused})})")
    assert len(results) == FLOOD
    assert all(n == 6 for n in served), "a served request lost tokens"
    assert all(s in (429, 503) and h for s, h in refused), refused
    assert len(served) >= MAX_NUM_SEQS
    assert_alive(base_url)
    s = requests.get(f"{base_url}/stats", timeout=10).json()
    assert s["num_running"] == 0 and s["num_waiting"] == 0 and s["num_slots_used"] == 0
