"""Expert placement changes on a running cluster executor: the replica's per-shard expert-load
metrics follow the placement in force, before and after a rebalance; a placement that a shard
cannot load leaves the old one in force with the same greedy tokens; and when even the old one
cannot be loaded, the executor reports itself unhealthy and the next step restarts its actors.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest tests/cluster/test_rebalance.py'"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

ray = pytest.importorskip("ray")
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from cluster.executor import ClusterExecutor, RebalanceError, State  # noqa: E402
from deployments.config import NextserveConfig  # noqa: E402
from deployments.monitor import ReplicaMonitor  # noqa: E402
from engine.llm_engine import LLMEngine  # noqa: E402
from engine.sampling import SamplingParams  # noqa: E402
from monitoring.sink import MetricsSink  # noqa: E402
from router.placement import ExpertPlacement  # noqa: E402
from tests.ray_fixtures import ray_session_fixture  # noqa: E402

PROMPTS = [[5, 17, 33, 2, 90], [7, 7, 120], [42]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
CONFIG = NextserveConfig.from_args({"cluster": {"step_timeout_s": 30},
                                    "pools": {"experts": {"actors": 2}}})


@pytest.fixture(scope="module")
def model_dir(hf_next_dir, tmp_path_factory):
    """A copy of the checkpoint, for the tests to break."""
    return shutil.copytree(hf_next_dir, tmp_path_factory.mktemp("rebalance") / "model")


ray_session = ray_session_fixture(num_cpus=8, autouse=False)


@pytest.fixture(scope="module")
def executor(ray_session, model_dir):
    ex = ClusterExecutor(model_dir, dtype="float32", num_slots=4, max_model_len=64, config=CONFIG)
    yield ex
    ex.shutdown()


@pytest.fixture(scope="module")
def reference(executor):
    return [c.token_ids for c in LLMEngine(executor).generate(PROMPTS, GREEDY)]


@contextmanager
def without_experts(model_dir: Path, experts: set[int]):
    """The checkpoint lacks these experts' tensors until the block ends."""
    (path,) = Path(model_dir).glob("*.safetensors")
    original = path.read_bytes()
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    kept = {k: v for k, v in load_file(str(path)).items()
            if not any(f".mlp.experts.{e}." in k for e in experts)}
    save_file(kept, str(path), metadata=metadata)
    try:
        yield
    finally:
        path.write_bytes(original)


def test_per_shard_metrics_follow_the_placement(executor, reference):
    llm = LLMEngine(executor)
    monitor = ReplicaMonitor(SimpleNamespace(engine=llm), CONFIG, MetricsSink(ray_export=False))
    seen: list[dict[int, list[int]]] = []
    llm.step_hooks.append(lambda _s, _t, counts: seen.append(counts))
    load = monitor.engine_metrics.expert_load
    assert executor.expert_placement == ExpertPlacement.even(8, 2)
    for placement in (executor.expert_placement, ExpertPlacement.from_lists(8, [[0, 1, 2], [3, 4, 5, 6, 7]])):
        if placement != executor.expert_placement:
            assert executor.set_expert_placement(placement) > 0
        assert [c.token_ids for c in llm.generate(PROMPTS, GREEDY)] == reference
        assert load.to_json()["shards"] == [list(s) for s in executor.expert_placement.shards]
        counts = seen[-1]
        assert counts
        for layer, c in counts.items():
            want = tuple(sum(c[e] for e in held) for held in placement.shards)
            assert load.last_step[layer].per_shard == want, layer


def test_a_placement_a_shard_cannot_load_leaves_the_old_one(executor, reference, model_dir):
    old = executor.expert_placement
    x = old.shards[1][-1]
    with without_experts(model_dir, {x}), pytest.raises(RebalanceError, match="the old one is back"):
        # shard 0 would have to read a second copy of expert x; shard 1 stays as it is
        executor.set_expert_placement(ExpertPlacement.from_lists(8, [[*old.shards[0], x], old.shards[1]]))
    assert executor.expert_placement == old
    assert executor.state is State.RUNNING and executor.healthy()
    assert [c.token_ids for c in LLMEngine(executor).generate(PROMPTS, GREEDY)] == reference


def test_when_the_old_placement_fails_too_the_next_step_restarts(executor, reference, model_dir):
    old = executor.expert_placement
    x = old.shards[0][0]
    recoveries = executor.num_recoveries
    # expert x moves from shard 0 to shard 1: shard 1 cannot read it, nor shard 0 its old experts back
    moved = ExpertPlacement.from_lists(8, [old.shards[0][1:], [x, *old.shards[1]]])
    with without_experts(model_dir, {x}):
        with pytest.raises(RebalanceError, match="the next step restarts"):
            executor.set_expert_placement(moved)
        assert executor.state is State.BROKEN and not executor.healthy()
        with pytest.raises(RuntimeError, match="broken"):
            executor.set_expert_placement(old)
    # the checkpoint is whole again: the next step restarts every actor with the old placement
    assert [c.token_ids for c in LLMEngine(executor).generate(PROMPTS, GREEDY)] == reference
    assert executor.num_recoveries == recoveries + 1 and executor.last_recovery_detail == "all actors"
    assert executor.expert_placement == old and executor.healthy()
