"""Speculative decoding over HTTP: an app whose engine drafts with the MTP layer
(engine.speculative_tokens: 2) answers greedy completions, streamed or not, with the tokens and
logprobs of the engine without speculation, and reports its drafts in /stats."""

from __future__ import annotations

import openai
import pytest
import requests

ray = pytest.importorskip("ray")

from engine.llm_engine import LLMEngine  # noqa: E402
from engine.local_executor import LocalExecutor  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from tests.serve_app import running_app  # noqa: E402

MAX_MODEL_LEN = 256
TIMEOUT = 60


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("spec_serve"), arch="qwen3_next")


@pytest.fixture(scope="module")
def base_url(tiny_dir):
    args = dict(model=str(tiny_dir), dtype="float32", executor="local",
                engine=dict(max_num_seqs=4, max_model_len=MAX_MODEL_LEN, speculative_tokens=2),
                serve=dict(served_model_name="tiny", torch_threads=1))
    with running_app(args, num_cpus=2) as url:
        yield url


def test_greedy_completions_over_http_equal_no_speculation(base_url, tiny_dir):
    client = openai.OpenAI(base_url=f"{base_url}/v1", api_key="none", timeout=TIMEOUT, max_retries=0)
    engine = LLMEngine(LocalExecutor(tiny_dir, num_slots=1, max_model_len=MAX_MODEL_LEN))
    prompts = [[5, 9, 13, 2, 77], [101, 7], [3, 3, 3, 250, 17, 40, 41]]
    for prompt in prompts:
        (want,) = engine.generate([prompt], SamplingParams(temperature=0, max_tokens=12, logprobs=True,
                                                           ignore_eos=True))
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                      extra_body={"return_token_ids": True, "ignore_eos": True})
        choice = r.choices[0]
        assert list((choice.model_extra or {})["token_ids"]) == list(want.token_ids)
        assert choice.logprobs.token_logprobs == pytest.approx(list(want.logprobs), abs=5e-4)
        stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0,
                                           stream=True, extra_body={"return_token_ids": True,
                                                                    "ignore_eos": True})
        ids, text = [], ""
        for chunk in stream:
            if chunk.choices:  # the usage chunk has none
                ids += (chunk.choices[0].model_extra or {}).get("token_ids") or []
                text += chunk.choices[0].text
        assert ids == list(want.token_ids) and text == choice.text
    stats = requests.get(f"{base_url}/stats", timeout=10).json()
    assert stats["spec_decode_num_draft_tokens"] > 0 and len(stats["spec_decode_accepted_per_pos"]) == 2
