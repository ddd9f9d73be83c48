"""The Serve application over HTTP, driven with the official `openai` client: completions and chat,
streaming or not, token-id prompts, logprobs and echo, stop strings, concurrency, cancellation,
errors and a full queue. One app for the module (starting Ray and Serve takes ~20 s); every
answer is checked against the engine run offline, one request at a time."""

from __future__ import annotations

import ipaddress
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import requests
import torch

ray = pytest.importorskip("ray")

from engine.executor import StepInput  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.local_executor import LocalExecutor  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from engine.tokenizer import Tokenizer  # noqa: E402
from tests.deployments.overload import burst  # noqa: E402
from tests.serve_app import running_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL = "tiny"
MAX_MODEL_LEN = 256
MAX_NUM_SEQS = 8
MAX_QUEUED = 24  # capacity 32: the concurrency test just fits, the queue test overflows it
TIMEOUT = 60


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("serve"), arch="qwen3_next")


@pytest.fixture(scope="module")
def base_url(tiny_dir):
    args = dict(model=str(tiny_dir), dtype="float32", executor="local",
                engine=dict(max_num_seqs=MAX_NUM_SEQS, max_model_len=MAX_MODEL_LEN,
                            max_num_batched_tokens=256),
                serve=dict(served_model_name=MODEL, max_queued_requests=MAX_QUEUED, retry_after_s=2,
                           torch_threads=1))
    with running_app(args, num_cpus=2) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url):
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def offline(tiny_dir):
    """The engine alone, one request at a time: what every answer must equal."""
    executor = LocalExecutor(tiny_dir, num_slots=1, max_model_len=MAX_MODEL_LEN)
    tokenizer = Tokenizer(tiny_dir)
    engine = LLMEngine(executor, tokenizer=tokenizer)

    def run(prompt_ids, **params):
        (c,) = engine.generate([list(prompt_ids)], SamplingParams(temperature=0, logprobs=True, **params))
        return c
    run.executor, run.tokenizer, run.engine = executor, tokenizer, engine
    return run


def extra(obj, name):
    return (obj.model_extra or {}).get(name)


def stats(base_url) -> dict:
    return requests.get(f"{base_url}/stats", timeout=10).json()


def wait_idle(base_url, timeout_s: float = 15) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        s = stats(base_url)
        if (s["num_slots_used"] == 0 and s["num_running"] == 0 and s["num_waiting"] == 0) \
                or time.monotonic() > deadline:
            return s
        time.sleep(0.1)


def test_models_and_health(base_url, client):
    assert requests.get(f"{base_url}/health", timeout=10).status_code == 200
    (card,) = client.models.list().data
    assert card.id == MODEL and extra(card, "max_model_len") == MAX_MODEL_LEN


def test_stats_keep_their_types(base_url):
    """/stats is the engine's stats as they are: booleans stay booleans, lists lists."""
    s = stats(base_url)
    assert s["compiling"] is False and s["compiled_buckets"] == []
    assert s["ingress"] == "proxy"  # serve.run: Serve's proxy, whatever serve.ingress says
    assert isinstance(s["spec_decode_accepted_per_pos"], list) and isinstance(s["num_slots"], int)


def test_completion_token_ids(client, offline):
    prompt = [5, 9, 13, 101, 7]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0,
                                  extra_body={"return_token_ids": True, "ignore_eos": True})
    want = offline(prompt, max_tokens=8, ignore_eos=True)
    (choice,) = r.choices
    assert extra(choice, "token_ids") == list(want.token_ids)
    assert extra(choice, "prompt_token_ids") == prompt
    assert choice.text == want.text and choice.finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 8)


def test_completion_text_list_and_stream(client, offline):
    prompts = ["The delta rule", "hello"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0,
                                  extra_body={"ignore_eos": True})
    for p, c in zip(prompts, sorted(r.choices, key=lambda c: c.index), strict=True):
        assert c.text == offline(offline.tokenizer.encode(p), max_tokens=6, ignore_eos=True).text
    chunks = list(client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=6, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True,
                                                                     "return_token_ids": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    ids = [t for c in chunks if c.choices for t in extra(c.choices[0], "token_ids") or ()]
    assert len(ids) == 6 and chunks[-1].usage.completion_tokens == 6 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_chat_uses_the_checkpoint_template(client, offline, tiny_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    want_prompt = AutoTokenizer.from_pretrained(tiny_dir).apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                       extra_body={"return_token_ids": True})
    assert extra(r, "prompt_token_ids") == list(want_prompt)
    want = offline(want_prompt, max_tokens=6)
    assert extra(r.choices[0], "token_ids") == list(want.token_ids)
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want.text
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)


def test_logprobs(client, offline):
    prompt = [3, 44, 87, 120]
    want = offline(prompt, max_tokens=5, ignore_eos=True)
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, logprobs=3,
                                  extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert lp.token_logprobs == pytest.approx(list(want.logprobs), abs=1e-4)
    # Greedy: the chosen token is the likeliest. (Distinct byte tokens may print alike and merge.)
    assert all(1 <= len(t) <= 4 and max(t.values()) == pytest.approx(v, abs=1e-5)
               for t, v in zip(lp.top_logprobs, lp.token_logprobs, strict=True))
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 2 for c in content)


def test_echo_scores_the_prompt(client, offline):
    """What evaluation harnesses send: echo the prompt, score each token, generate nothing."""
    prompt = [11, 22, 33, 44, 55, 66]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=0, echo=True, logprobs=1,
                                  temperature=0)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(prompt) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    n = len(prompt)
    logits = offline.executor.execute(StepInput(tuple(prompt), (0,), (0,), (n,), tuple(range(n - 1))))
    want = torch.log_softmax(logits, -1).gather(1, torch.tensor(prompt[1:])[:, None]).squeeze(1)
    assert lp.token_logprobs[1:] == pytest.approx(want.tolist(), abs=1e-4)
    assert r.choices[0].text == offline.tokenizer.decode(prompt, skip_special_tokens=False)


def test_stop_string(client):
    base = client.completions.create(model=MODEL, prompt="stop here", max_tokens=24, temperature=0,
                                     extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2:len(base) // 2 + 2]
    assert stop.strip(), f"text too short to pick a stop string from: {base!r}"
    want = base[:base.index(stop)]
    for stream in (False, True):
        r = client.completions.create(model=MODEL, prompt="stop here", max_tokens=24, temperature=0,
                                      stop=[stop], stream=stream, extra_body={"ignore_eos": True})
        if stream:
            chunks = [c for c in r if c.choices]
            text, reason = "".join(c.choices[0].text for c in chunks), chunks[-1].choices[0].finish_reason
        else:
            text, reason = r.choices[0].text, r.choices[0].finish_reason
        assert (text, reason) == (want, "stop")


def test_concurrent_greedy_requests_match_alone(base_url, offline):
    prompts = [[(7 * i + 3 * j) % 470 + 2 for j in range(1 + (i * 5) % 41)] for i in range(32)]
    max_tokens = [4 + i % 13 for i in range(32)]
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=120, max_retries=0)

    def one(i):
        r = client.completions.create(model=MODEL, prompt=prompts[i], max_tokens=max_tokens[i], temperature=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        return extra(r.choices[0], "token_ids")

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(one, range(32)))
    for i in range(32):
        assert got[i] == list(offline(prompts[i], max_tokens=max_tokens[i], ignore_eos=True).token_ids), i
    assert stats(base_url)["num_slots_used"] == 0


def test_cancelled_stream_frees_its_slot(base_url, client):
    start = wait_idle(base_url)
    stream = client.completions.create(model=MODEL, prompt="go on", max_tokens=200, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    for i, _ in enumerate(stream):
        if i == 2:
            break
    assert stats(base_url)["num_slots_used"] == start["num_slots_used"] + 1
    stream.close()
    end = wait_idle(base_url)
    assert end["num_slots_used"] == start["num_slots_used"] == 0
    assert end["num_generated_tokens"] - start["num_generated_tokens"] < 200


@pytest.mark.parametrize("body, status, param", [
    (dict(prompt="hi", max_tokens=-1), 400, "max_tokens"),
    (dict(prompt="hi", temperature=-0.5), 400, "temperature"),
    (dict(prompt=[5] * (MAX_MODEL_LEN + 1)), 400, "prompt"),
    (dict(prompt=[5] * (MAX_MODEL_LEN - 4), max_tokens=10), 400, "max_tokens"),
    (dict(prompt=[100000]), 400, "prompt"),
    (dict(prompt="hi", model="gpt-4"), 404, "model"),
    (dict(prompt="hi", n=MAX_NUM_SEQS + MAX_QUEUED + 1), 400, "n"),  # more choices than a replica admits
    (dict(prompt=["a", "b"], n=(MAX_NUM_SEQS + MAX_QUEUED) // 2 + 1), 400, "n"),
    (dict(prompt="hi", best_of=2), 400, "best_of"),  # as vLLM V1: n samples instead
    (dict(prompt="hi", logit_bias={"100000": 5}), 400, "logit_bias"),
    (dict(prompt="hi", logit_bias={"five": 5}), 400, "logit_bias"),
    (dict(prompt="hi", presence_penalty=2.5), 400, "presence_penalty"),
    (dict(prompt="hi", max_tokens=4, extra_body={"min_tokens": 5}), 400, "min_tokens"),
    (dict(prompt="hi", extra_body={"repetition_penalty": 0}), 400, "repetition_penalty"),
    (dict(prompt="hi", extra_body={"min_p": 1.5}), 400, "min_p"),
])
def test_bad_requests_get_openai_errors(client, body, status, param):
    body = {"model": MODEL, **body}
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(**body)
    assert e.value.status_code == status
    assert e.value.body["param"] == param and e.value.body["message"]
    if status == 400:
        with pytest.raises(openai.BadRequestError):
            client.completions.create(**body, stream=True)


def test_malformed_json_and_chat_errors(base_url, client):
    r = requests.post(f"{base_url}/v1/completions", data="{not json", timeout=10,
                      headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = requests.post(f"{base_url}/v1/chat/completions", json={"model": MODEL, "messages": []}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert requests.get(f"{base_url}/health", timeout=10).status_code == 200  # the replica lives on


def test_full_queue_gets_429_with_retry_after(base_url):
    n = MAX_NUM_SEQS + MAX_QUEUED + 8
    body = {"model": MODEL, "prompt": "wait", "max_tokens": 200, "stream": True, "ignore_eos": True}
    statuses = burst(base_url, body, n, n - MAX_NUM_SEQS - MAX_QUEUED)
    refused = [(h, e) for s, h, e in statuses if s == 429]
    assert len(statuses) == n and {s for s, _, _ in statuses} <= {200, 429}
    assert refused and all(h == "2" and e == "RateLimitError" for h, e in refused)
    assert wait_idle(base_url)["num_slots_used"] == 0
    assert requests.get(f"{base_url}/health", timeout=10).status_code == 200


def test_error_body_is_json(base_url):
    r = requests.post(f"{base_url}/v1/completions", json={"model": MODEL, "prompt": "x", "top_p": 0},
                      timeout=10)
    assert r.status_code == 400 and json.loads(r.text)["error"]["param"] == "top_p"


def test_rebalance_is_off_without_an_admin_key(base_url):
    r = requests.post(f"{base_url}/rebalance", timeout=10)
    assert r.status_code == 403 and "serve.admin_api_key" in r.json()["error"]["message"]


def _listening_addresses_of(pids: set[int]) -> list[tuple[int, str]]:
    """(pid, "ADDR:PORT" as /proc/net/tcp{,6} writes it) for every listening TCP socket of `pids`."""
    listening = {}
    for table in ("tcp", "tcp6"):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A":  # LISTEN
                listening[f[9]] = f[1]
    found = []
    for pid in pids:
        try:
            links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
        except OSError:
            continue
        inodes = [ln[8:-1] for ln in links if ln.startswith("socket:[")]
        found += [(pid, listening[i]) for i in inodes if i in listening]
    return found


def test_replica_listens_on_loopback_only(base_url):
    """Ray Serve binds each replica's inter-deployment gRPC port to every interface; on a cluster
    whose node address is loopback, nextserve's replica keeps it on loopback."""
    import ray

    if not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        pytest.skip("Ray took a non-loopback node address (no loopback-only network namespace here)")
    replicas = {int(d) for d in os.listdir("/proc")
                if d.isdigit() and _comm(int(d)).startswith("ray::ServeRepl")}
    assert replicas, "no Serve replica process found"
    sockets = _listening_addresses_of(replicas)
    assert sockets, "the replica listens on nothing"
    loopback = ("0100007F:", "00000000000000000000000001000000:", "0000000000000000FFFF00000100007F:")
    assert all(addr.startswith(loopback) for _, addr in sockets), sockets


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def sampled(offline, prompt_ids, **params) -> list[int]:
    """The engine alone, with the given sampling params (not only greedy)."""
    (c,) = offline.engine.generate([list(prompt_ids)], SamplingParams(**params))
    return list(c.token_ids)


def test_n_choices_are_independent_seeded_requests(client, offline):
    """Choice i * n + j is prompt i's j-th, seeded seed + j as vLLM seeds them: distinct samples,
    the same ones on every retry, each what the engine gives that seed alone."""
    prompts = [[5, 9, 13, 101, 7], [44, 2, 8]]
    body = dict(model=MODEL, prompt=prompts, n=3, max_tokens=6, temperature=1.0, seed=123,
                extra_body={"return_token_ids": True, "ignore_eos": True})
    r = client.completions.create(**body)
    assert [c.index for c in r.choices] == list(range(6))
    got = [extra(c, "token_ids") for c in r.choices]
    for i, p in enumerate(prompts):
        for j in range(3):
            assert got[i * 3 + j] == sampled(offline, p, max_tokens=6, temperature=1.0, seed=123 + j,
                                             ignore_eos=True), (i, j)
            assert extra(r.choices[i * 3 + j], "prompt_token_ids") == p
        assert len({tuple(t) for t in got[i * 3:i * 3 + 3]}) == 3
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (8, 36)  # each prompt counted once
    assert [extra(c, "token_ids") for c in client.completions.create(**body).choices] == got
    chunks = list(client.completions.create(**body, stream=True))
    for c in r.choices:
        assert "".join(ch.choices[0].text for ch in chunks if ch.choices and ch.choices[0].index == c.index) \
            == c.text
    assert chunks[-1].usage.completion_tokens == 36 and chunks[-1].usage.prompt_tokens == 8


def test_chat_n_choices_stream_and_not(client, offline):
    messages = [{"role": "user", "content": "tell me a story"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, n=3, max_tokens=5, temperature=1.0,
                                       seed=7, extra_body={"return_token_ids": True, "ignore_eos": True})
    prompt = extra(r, "prompt_token_ids")
    assert [c.index for c in r.choices] == [0, 1, 2]
    for j, c in enumerate(r.choices):
        assert extra(c, "token_ids") == sampled(offline, prompt, max_tokens=5, temperature=1.0, seed=7 + j,
                                                ignore_eos=True)
        assert c.message.role == "assistant" and c.finish_reason == "length"
    assert len({c.message.content for c in r.choices}) == 3
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(prompt), 15)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, n=3, max_tokens=5,
                                                 temperature=1.0, seed=7, stream=True,
                                                 extra_body={"ignore_eos": True}))
    roles = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    for c in r.choices:
        parts = [ch.choices[0] for ch in chunks if ch.choices and ch.choices[0].index == c.index]
        assert "".join(p.delta.content or "" for p in parts) == c.message.content
        assert parts[-1].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 15


def test_penalties_bias_and_min_tokens_over_http_match_the_engine(client, offline):
    prompt = [3, 44, 87, 120, 3, 44]
    options = [dict(presence_penalty=1.5, frequency_penalty=0.5), dict(logit_bias={"17": 8.0}),
               dict(extra_body={"repetition_penalty": 1.6, "min_p": 0.1}),
               dict(extra_body={"min_tokens": 6})]
    for o in options:
        body = {**o, "extra_body": {**o.get("extra_body", {}), "return_token_ids": True}}
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=8, temperature=0, **body)
        params = {**{k: v for k, v in o.items() if k != "extra_body"}, **o.get("extra_body", {})}
        if "logit_bias" in params:
            params["logit_bias"] = {int(k): v for k, v in params["logit_bias"].items()}
        want = sampled(offline, prompt, max_tokens=8, temperature=0, **params)
        assert extra(r.choices[0], "token_ids") == want, o
    biased = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0,
                                       logit_bias={"17": 100}, extra_body={"return_token_ids": True})
    assert extra(biased.choices[0], "token_ids") == [17] * 4
    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                          max_tokens=3, temperature=0, logit_bias={"17": 100},
                                          extra_body={"return_token_ids": True})
    assert extra(chat.choices[0], "token_ids") == [17] * 3


def test_tokenize_and_detokenize(base_url, offline, tiny_dir):
    from transformers import AutoTokenizer

    text = "The delta rule, step by step."
    body = {"model": MODEL, "prompt": text, "return_token_strs": True}
    r = requests.post(f"{base_url}/tokenize", json=body, timeout=10).json()
    hf = AutoTokenizer.from_pretrained(tiny_dir)
    assert r["tokens"] == offline.tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == MAX_MODEL_LEN and r["token_strs"] == hf.convert_ids_to_tokens(r["tokens"])
    plain = requests.post(f"{base_url}/tokenize", json={"prompt": text}, timeout=10).json()  # model optional
    assert plain["tokens"] == r["tokens"] and plain["token_strs"] is None
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    for gen in (True, False):
        body = {"messages": messages, "add_generation_prompt": gen}
        chat = requests.post(f"{base_url}/tokenize", json=body, timeout=10).json()
        want = hf.apply_chat_template(messages, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert chat["tokens"] == list(want), gen
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                               "parameters": {"type": "object", "properties": {}}}}]
    body = {"messages": messages, "tools": tools}
    chat = requests.post(f"{base_url}/tokenize", json=body, timeout=10).json()
    want = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=True,
                                  return_dict=False)
    assert chat["tokens"] == list(want) and "get_weather" in hf.decode(want)
    back = requests.post(f"{base_url}/detokenize", json={"model": MODEL, "tokens": r["tokens"]}, timeout=10)
    assert back.json() == {"prompt": text}
    ids = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert requests.post(f"{base_url}/detokenize", json={"tokens": list(ids)}, timeout=10).json()["prompt"] \
        == hf.decode(ids)  # special tokens included, as vLLM


@pytest.mark.parametrize("route, body, status, param", [
    ("detokenize", {"tokens": [5, 100000]}, 400, "tokens"),
    ("detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("detokenize", {"tokens": "abc"}, 400, "tokens"),
    ("detokenize", {"tokens": [5], "model": "gpt-4"}, 404, "model"),
    ("tokenize", {"prompt": 5}, 400, "prompt"),
    ("tokenize", {"prompt": "x", "frobnicate": 1}, 400, "frobnicate"),
    ("tokenize", {"messages": []}, 400, "messages"),
    ("tokenize", {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": {"messages": 1}},
     400, "chat_template_kwargs"),
    ("tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("tokenize", {}, 400, "prompt"),
])
def test_tokenize_errors_name_the_field(base_url, route, body, status, param):
    r = requests.post(f"{base_url}/{route}", json=body, timeout=10)
    assert r.status_code == status and r.json()["error"]["param"] == param, r.text


def test_missing_builtin_model_is_a_config_error_naming_the_fix(tmp_path, monkeypatch):
    """The built-in model ships with the repository; without it the app refuses to start rather
    than serve random weights in its place."""
    import deployments.app as app
    from engine.config import NextserveConfigError

    monkeypatch.setattr(app, "TINY_MODEL_DIR", tmp_path / "tiny-qwen3-next")
    with pytest.raises(NextserveConfigError, match="git checkout -- models/tiny-qwen3-next"):
        app.resolve_model(None)


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(client):
    # 40 prompt tokens and 4 more: the DeltaNet state at the prompt's last block boundary (32) is
    # kept, since the output reaches no later one, so the same prompt again resumes there
    prompt = [(7 * i) % 200 + 5 for i in range(40)]
    first, second = (client.completions.create(model=MODEL, prompt=prompt, max_tokens=4, temperature=0)
                     for _ in range(2))
    assert first.choices[0].text == second.choices[0].text
    assert first.usage.prompt_tokens_details.cached_tokens == 0, first.usage
    assert second.usage.prompt_tokens_details.cached_tokens == 32, second.usage
