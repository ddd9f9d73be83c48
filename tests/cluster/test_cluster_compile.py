"""`engine.compile` with the cluster executor, its actors under Ray: a decode step of a batch
bucket no mixer has compiled yet first compiles it on every mixer by plain calls (the step graph
paused: a compile takes far longer than cluster.step_timeout_s allows a step), then runs through
the compiled graph; logits within the README's compiled tolerance of the local executor's eager
ones, the same greedy tokens. Then prefix caching and MTP speculative decoding on compiled actors
give the local executor's greedy tokens without either. Few compiles (each costs tens of seconds
on a 2-core machine); tests/cluster/test_compiled_workers.py checks both architectures without Ray.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest \
        tests/cluster/test_cluster_compile.py'"""

from __future__ import annotations

import dataclasses
import random

import pytest

ray = pytest.importorskip("ray")

from cluster.executor import ClusterExecutor  # noqa: E402
from deployments.config import NextserveConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.local_executor import LocalExecutor  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from router.placement import ExpertPlacement  # noqa: E402
from tests.cluster.test_compiled_workers import assert_close_logits, steps  # noqa: E402
from tests.ray_fixtures import ray_session_fixture  # noqa: E402

SIZES = dict(dtype="float32", num_slots=4, max_model_len=64, block_size=8, num_kv_blocks=32)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# Generous: several actors compile side by side on two shared cores.
CLUSTER = {"cluster": {"timeout_s": 900, "step_timeout_s": 120}}


ray_session = ray_session_fixture(num_cpus=16)


def compiled_graphs(cluster: ClusterExecutor) -> dict[str, list]:
    """Per actor, the graphs it compiled: a mixer's (bucket, mixer kind, MLP kind), a shard's
    "experts". Asked by plain calls, which leave the cluster on them."""
    cluster.configure_step(data_plane="remote_calls")
    keys = ray.get([a.__ray_call__.remote(lambda w: sorted(w.decode.compiles.seconds))
                    for a in cluster.actors.actors], timeout=60)
    return dict(zip(cluster.actor_names(), keys, strict=True))


def test_compiled_actors_match_the_local_eager_executor(hf_next_dir):
    config = NextserveConfig.from_args({**CLUSTER, "pools": {"experts": {"actors": 2}}})
    cluster = ClusterExecutor(hf_next_dir, config=config, compile=True, **SIZES)
    try:
        assert cluster.decode_buckets == (1, 2, 4) and cluster.compiled_buckets() == ((), False)
        local = LocalExecutor(hf_next_dir, **SIZES)
        for i, step in enumerate(steps()):
            assert_close_logits(cluster.execute(step), local.execute(step), f"step {i}")
        assert cluster.compiled_buckets() == ((4,), False)
        c = cluster.config  # one graph per kind of layer a mixer holds, all in the bucket of 4
        kinds = {m.name: sorted({(4, "Attention" if c.layer_types[i] == "full_attention" else "GatedDeltaNet",
                                  "SparseMoeBlock" if c.is_moe_layer(i) else "MLP") for i in m.layers})
                 for m in cluster.placement.mixers}
        assert set(kinds) == {"attention-0", "deltanet-0"}
        assert compiled_graphs(cluster) == {**kinds, "experts-0": ["experts"], "experts-1": ["experts"]}
        # Rebalancing changes what the shards hold (other shapes): the next decode step compiles
        # their graph again first, and still matches.
        old = cluster.expert_placement
        shards = [[*old.shards[0], old.shards[1][0]], list(old.shards[1])]  # a copy of one expert more
        cluster.set_expert_placement(ExpertPlacement.from_lists(old.num_experts, shards))
        assert cluster.compiled_buckets() == ((), False)
        step = steps()[1]  # slots 0-2 decode again, one token later than their first decode
        step = dataclasses.replace(step, starts=tuple(s + 4 for s in step.starts))
        assert_close_logits(cluster.execute(step), local.execute(step), "after rebalancing")
        assert cluster.compiled_buckets() == ((4,), False)
    finally:
        cluster.shutdown()


def test_prefix_caching_and_speculative_decoding_on_compiled_actors(tmp_path):
    """A chat's turns with prefix caching and MTP drafts (verify steps run eagerly, decode steps
    without drafts compiled) give the tokens of the local executor without either."""
    from model.tiny import make_tiny_model

    model = make_tiny_model(tmp_path / "next", arch="qwen3_next")  # with its MTP layer
    sizes = dict(SIZES, num_slots=2, max_model_len=128, block_size=4, num_kv_blocks=64)
    cluster = ClusterExecutor(model, config=NextserveConfig.from_args(CLUSTER), compile=True,
                              num_state_snapshots=8, speculative_tokens=2, **sizes)
    try:
        on = LLMEngine(cluster, prefix_cache_state_interval=2)
        off = LLMEngine(LocalExecutor(model, **sizes), enable_prefix_caching=False)
        rng = random.Random(0)
        histories = [[rng.randrange(3, 380) for _ in range(13)] for _ in range(2)]
        for turn in range(2):
            prompts = [h + [rng.randrange(3, 380) for _ in range(5)] for h in histories]
            hits = on.stats.prefix_cache_hit_tokens
            got, want = on.generate(prompts, GREEDY), off.generate(prompts, GREEDY)
            assert [g.token_ids for g in got] == [w.token_ids for w in want], f"turn {turn}"
            if turn == 1:
                assert on.stats.prefix_cache_hit_tokens - hits >= 2 * 20
            histories = [p + list(g.token_ids) for p, g in zip(prompts, got, strict=True)]
        assert cluster.compiled_buckets()[0]  # some decode steps had no drafts, and ran compiled
        assert any(compiled_graphs(cluster).values())
    finally:
        cluster.shutdown()
