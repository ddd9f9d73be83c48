"""Several nodes: on a simulated 3-node Ray cluster each pool lands on the node its ray_config
says (a node label for attention and experts, a custom resource for DeltaNet), generation
matches the local executor, and expert rebalancing in the middle of generation (skewed prompts)
lowers max/mean shard load without changing a token.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest tests/cluster -q'"""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402
from ray.util.placement_group import placement_group_table  # noqa: E402

from cluster.config import RebalanceSettings  # noqa: E402
from cluster.executor import ClusterExecutor  # noqa: E402
from cluster.rebalance import RebalancePolicy  # noqa: E402
from deployments.config import NextserveConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.local_executor import LocalExecutor  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from router.eplb import imbalance  # noqa: E402
from router.placement import ExpertPlacement  # noqa: E402
from tests.ray_fixtures import init_ray  # noqa: E402

SLOTS, MAX_LEN = 4, 64
GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
# Skewed: one token over and over sends most pairs to the same few experts of each layer.
PROMPTS = [[100] * 16, [100] * 15, [100] * 14, [100] * 12]
POOLS = {
    "attention": {"actors": 1, "label_selector": {"pool": "attention"}},
    "deltanet": {"actors": 1, "resources": {"num_cpus": 1, "resources": {"deltanet_node": 1}}},
    "experts": {"actors": 2, "label_selector": {"pool": "experts"}, "strategy": "SPREAD"},
}


@pytest.fixture(scope="module")
def nodes():
    """{pool: node id} of a head node (attention) and two workers (DeltaNet, experts)."""
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=1, labels={"pool": "attention"}))
    deltanet = cluster.add_node(num_cpus=1, resources={"deltanet_node": 1})
    experts = cluster.add_node(num_cpus=2, labels={"pool": "experts"})
    cluster.wait_for_nodes(timeout=60)
    init_ray(address=cluster.address)
    yield {"attention": cluster.head_node.node_id, "deltanet": deltanet.node_id, "experts": experts.node_id}
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture(scope="module")
def executor(nodes, hf_next_dir):
    config = NextserveConfig.from_args({"pools": POOLS})
    ex = ClusterExecutor(hf_next_dir, dtype="float32", num_slots=SLOTS, max_model_len=MAX_LEN, config=config)
    yield ex
    ex.shutdown()


@pytest.fixture(scope="module")
def local_tokens(hf_next_dir):
    local = LocalExecutor(hf_next_dir, dtype="float32", num_slots=SLOTS, max_model_len=MAX_LEN)
    return [c.token_ids for c in LLMEngine(local).generate(PROMPTS, GREEDY)]


def test_pools_land_on_their_nodes(executor, nodes):
    assert len({n["NodeID"] for n in ray.nodes() if n["Alive"]}) == 3
    for pool, want in nodes.items():
        placed = placement_group_table(executor.session.groups[pool])["bundles_to_node_id"]
        assert set(placed.values()) == {want}, pool


def test_generation_matches_local(executor, local_tokens):
    assert [c.token_ids for c in LLMEngine(executor).generate(PROMPTS, GREEDY)] == local_tokens


def test_rebalance_mid_generation_lowers_shard_load_with_same_tokens(executor, local_tokens):
    even = ExpertPlacement.even(8, 2)
    assert executor.placement.experts == even
    engine = LLMEngine(executor)
    policy = RebalancePolicy(executor, RebalanceSettings(redundant_experts=1, min_gain=0.0))
    seen: list[dict[int, list[int]]] = []
    engine.step_hooks += [policy, lambda _s, _t, counts: seen.append(counts)]
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"r{i}", p, GREEDY)
    outputs: dict[str, tuple[int, ...]] = {f"r{i}": () for i in range(len(PROMPTS))}
    steps = 0
    while engine.has_unfinished():
        if steps == 3:  # requests in flight, caches full of their state
            policy.request()
        for o in engine.step():
            outputs[o.request_id] += o.new_token_ids
        steps += 1
    result = policy.last_result
    assert result is not None and result.applied, result
    assert executor.placement.experts.shards == result.shards != even.shards
    assert sum(len(s) for s in result.shards) == 8 + 1  # one redundant copy
    assert [outputs[f"r{i}"] for i in range(len(PROMPTS))] == local_tokens
    # The load the whole run put on the shards, under the old and the new placement.
    load = torch.tensor([[c for _, c in sorted(s.items())] for s in seen if s]).sum(0)  # [L, E]
    before, after = imbalance(load, even), imbalance(load, executor.placement.experts)
    print(f"\nrebalance on 3 nodes: max/mean shard load {before:.3f} -> {after:.3f} "
          f"(window {result.before:.3f} -> {result.after:.3f}), applied in {result.seconds:.2f}s")
    assert after < before
    # and generation afterwards still matches
    assert [c.token_ids for c in LLMEngine(executor).generate(PROMPTS, GREEDY)] == local_tokens
