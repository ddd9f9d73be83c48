"""A node of a simulated three-node Ray cluster (ray.cluster_utils.Cluster: a head without CPUs
and two worker nodes) is removed while greedy generations run: the actors it held come back on
the other node, and every request ends with the tokens of an undisturbed run.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest FILE -s'
with FILE tests/cluster/test_node_loss.py."""

from __future__ import annotations

import time

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

from cluster.executor import ClusterExecutor  # noqa: E402
from deployments.config import NextserveConfig  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from tests.ray_fixtures import init_ray  # noqa: E402

PROMPTS = [[5, 17, 33, 2, 90], [7, 7, 120], [42]]
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
HALF_CPU = {"resources": {"num_cpus": 0.5}}  # all four actors fit on one 2-CPU node


@pytest.fixture(scope="module")
def cluster():
    # Fast health checks, so that a removed node is declared dead within a few seconds.
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": {
        "health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
        "health_check_failure_threshold": 4}})
    workers = [c.add_node(num_cpus=2) for _ in range(2)]
    init_ray(address=c.address)
    c.wait_for_nodes()
    yield c, workers
    ray.shutdown()
    c.shutdown()


def bundle_nodes(ex: ClusterExecutor) -> dict[str, set[str]]:
    """The nodes each pool's placement group has its bundles on."""
    return {name: set(ray.util.placement_group_table(pg)["bundles_to_node_id"].values())
            for name, pg in ex.session.groups.items()}


def test_removed_node_actors_come_back_elsewhere(cluster, hf_next_dir):
    c, workers = cluster
    ex = ClusterExecutor(hf_next_dir, dtype="float32", num_slots=4, max_model_len=64,
                         config=NextserveConfig.from_args({
                             "cluster": {"step_timeout_s": 10, "timeout_s": 60},
                             "pools": {"attention": HALF_CPU, "deltanet": HALF_CPU,
                                       "experts": {"actors": 2, **HALF_CPU}}}))
    try:
        engine = LLMEngine(ex)
        reference = [c.token_ids for c in engine.generate(PROMPTS, GREEDY)]
        before = bundle_nodes(ex)
        victim_id = next(iter(before["experts"]))
        (victim,) = [w for w in workers if w.node_id == victim_id]
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"r{i}", p, GREEDY)
        outputs: dict[str, list[int]] = {f"r{i}": [] for i in range(len(PROMPTS))}
        removed_at = resumed_at = None
        while engine.has_unfinished():
            for out in engine.step():
                outputs[out.request_id] += out.new_token_ids
                if removed_at is not None and resumed_at is None:
                    resumed_at = time.monotonic()
            if removed_at is None and len(outputs["r0"]) == 6:
                c.remove_node(victim)
                removed_at = time.monotonic()
        after = bundle_nodes(ex)
        held = sorted(k for k, v in before.items() if victim_id in v)
        print(f"\n[node loss] removed {victim_id[:8]} (held {held}); restarted in "
              f"{ex.last_recovery_s:.2f}s, tokens flowed again {resumed_at - removed_at:.2f}s after "
              f"the removal; bundles now on {[n[:8] for n in set().union(*after.values())]}\n"
              f"            restarted {ex.last_recovery_detail}")
        assert ex.num_recoveries == 1
        assert all(victim_id not in nodes for nodes in after.values())
        assert [tuple(outputs[f"r{i}"]) for i in range(len(PROMPTS))] == reference
    finally:
        ex.shutdown()
