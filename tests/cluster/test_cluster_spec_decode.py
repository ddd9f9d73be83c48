"""MTP speculative decoding over the cluster executor: the drafter runs in the driver on the last
mixer's hidden states, the DeltaNet actors keep each verify step's per-position states and roll
back with the next step (lane 0, before the state saves). Greedy tokens equal the local executor's
without speculation: with the MTP's drafts, with oracle drafts wrong at random positions (every
accepted length rolled back to), in one micro-batch lane and two, and across a DeltaNet actor
killed mid-generation (its kept states die with it: the sequences are recomputed).

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest \
        tests/cluster/test_cluster_spec_decode.py'"""

from __future__ import annotations

import random

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster.executor import ClusterExecutor  # noqa: E402
from deployments.config import NextserveConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.local_executor import LocalExecutor  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from tests.engine.test_spec_decode import oracle_drafts  # noqa: E402
from tests.ray_fixtures import init_ray  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=14, ignore_eos=True, logprobs=True)
SIZES = dict(dtype="float32", num_slots=3, max_model_len=128, block_size=4)


@pytest.fixture(scope="module")
def next_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_next"), arch="qwen3_next")  # with its MTP layer


def test_cluster_speculative_decoding_equals_the_local_executor_without_it(next_dir):
    init_ray(num_cpus=8)
    config = NextserveConfig.from_args({"cluster": {"step_timeout_s": 10}})
    cluster = ClusterExecutor(next_dir, config=config, num_state_snapshots=8, speculative_tokens=2, **SIZES)
    try:
        spec = LLMEngine(cluster, prefix_cache_state_interval=2)
        off = LLMEngine(LocalExecutor(next_dir, **SIZES), enable_prefix_caching=False)
        rng = random.Random(0)
        for round_ in range(4):
            prompts = [[rng.randrange(3, 380) for _ in range(rng.randrange(6, 20))] for _ in range(3)]
            want = off.generate(prompts, GREEDY)
            if round_ == 1:  # partial acceptance at every position
                oracle_drafts(spec, want, prompts, wrong=0.3, seed=1)
            if round_ == 2:  # two micro-batch lanes: the rollbacks travel in lane 0
                cluster.configure_step(micro_batch_tokens=4)
                assert cluster.num_lanes == 2
            if round_ == 3:  # a DeltaNet actor dies after the first steps
                name = next(m.name for m in cluster.placement.mixers if m.name.startswith("deltanet"))
                recoveries = cluster.num_recoveries
                for i, p in enumerate(prompts):
                    spec.add_request(f"r{i}", p, GREEDY)
                tokens: dict[str, list[int]] = {f"r{i}": [] for i in range(3)}
                steps = 0
                while spec.has_unfinished():
                    if steps == 4:
                        ray.kill(cluster.actors.mixers[cluster.actor_names().index(name)], no_restart=True)
                    for o in spec.step():
                        tokens[o.request_id] += o.new_token_ids
                    steps += 1
                assert cluster.num_recoveries == recoveries + 1
                assert [tokens[f"r{i}"] for i in range(3)] == [list(w.token_ids) for w in want]
                continue
            got = spec.generate(prompts, GREEDY)
            if round_ == 1:
                del spec._propose  # the MTP's own drafts again
            for g, w in zip(got, want, strict=True):
                assert g.token_ids == w.token_ids, f"round {round_}"
                torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=5e-4,
                                           atol=1e-4)
        st = spec.stats
        assert 0 < st.spec_decode_num_accepted_tokens < st.spec_decode_num_draft_tokens
    finally:
        cluster.shutdown()
        ray.shutdown()
