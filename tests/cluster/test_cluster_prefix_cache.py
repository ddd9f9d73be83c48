"""Prefix caching over the cluster executor: the DeltaNet actors save and load the states the
engine names, the attention actors read the shared blocks; a chat's turns give the tokens of the
local executor without the cache, in one micro-batch lane and in two (the state copies travel in
lane 0, which reaches every layer first). Then the DeltaNet actor is killed between turns: its saved
states are gone with it, and the next turn is recomputed, never resumed from a lost state.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest \
        tests/cluster/test_cluster_prefix_cache.py'"""

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
from tests.ray_fixtures import init_ray  # noqa: E402

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=True)
SIZES = dict(dtype="float32", num_slots=2, max_model_len=128, block_size=4)


def test_cluster_turns_hit_and_a_killed_deltanet_actor_means_recompute(hf_next_dir):
    init_ray(num_cpus=8)
    config = NextserveConfig.from_args({"cluster": {"step_timeout_s": 10}})
    cluster = ClusterExecutor(hf_next_dir, config=config, num_state_snapshots=8, **SIZES)
    try:
        on = LLMEngine(cluster, prefix_cache_state_interval=2)
        off = LLMEngine(LocalExecutor(hf_next_dir, **SIZES), enable_prefix_caching=False)
        rng = random.Random(0)
        histories = [[rng.randrange(3, 380) for _ in range(13)] for _ in range(2)]
        for turn in range(3):
            if turn == 1:  # two micro-batch lanes: lane 1's sequences load their states in lane 0
                cluster.configure_step(micro_batch_tokens=4)
                assert cluster.num_lanes == 2
            if turn == 2:  # the states saved so far die with the actor that held them
                name = next(m.name for m in cluster.placement.mixers if m.name.startswith("deltanet"))
                ray.kill(cluster.actors.mixers[cluster.actor_names().index(name)], no_restart=True)
                recoveries = cluster.num_recoveries
            prompts = [h + [rng.randrange(3, 380) for _ in range(5)] for h in histories]
            hits = on.stats.prefix_cache_hit_tokens
            got, want = on.generate(prompts, GREEDY), off.generate(prompts, GREEDY)
            for g, w in zip(got, want, strict=True):
                assert g.token_ids == w.token_ids, f"turn {turn}"
                torch.testing.assert_close(torch.tensor(g.logprobs), torch.tensor(w.logprobs), rtol=5e-4,
                                           atol=1e-4)
            if turn == 1:  # each resumed at the last block boundary of its previous turn
                assert on.stats.prefix_cache_hit_tokens - hits >= 2 * 20
            histories = [p + list(g.token_ids) for p, g in zip(prompts, got, strict=True)]
        assert cluster.num_recoveries == recoveries + 1
        assert on.scheduler.prefix.num_states_held > 0  # saved again on the restarted actor
    finally:
        cluster.shutdown()
        ray.shutdown()
