"""The sockets data plane (cluster/dataplane.py) on Ray actors: the programs it derives from the
step graph's wiring, an exception inside an actor reaching the driver with its text (and the next
step running), and an actor dying in the middle of a step being noticed at once and restarted.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest tests/cluster/test_dataplane.py'"""

from __future__ import annotations

import os
import time

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster.dataplane import DRIVER, DataPlaneActorError, Ref, SocketStep, programs, record  # noqa: E402
from cluster.executor import ClusterExecutor, State  # noqa: E402
from cluster.placement import resolve_placement  # noqa: E402
from deployments.config import NextserveConfig  # noqa: E402
from engine.executor import ExecutorStateLostError, StepInput  # noqa: E402
from engine.local_executor import LocalExecutor  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from tests.ray_fixtures import ray_session_fixture  # noqa: E402

PREFILL = StepInput((5, 17, 33, 2, 90, 7, 7), (0, 1), (0, 0), (4, 3), (3, 6))


def test_programs_follow_the_wiring(hf_next_dir):
    model = ModelConfig.from_dir(hf_next_dir)
    config = NextserveConfig.from_args({"pools": {"experts": {"actors": 2}}})
    placement = resolve_placement(config.pools, model)
    ops, results = record(model, placement, num_lanes=2)
    names = [m.name for m in placement.mixers] + ["experts-0", "experts-1"]
    progs = programs(ops, results, names)
    assert sum(len(p.ops) for p in progs) == len(ops)
    moe = sum(model.is_moe_layer(i) for i in range(model.num_hidden_layers))
    assert [len(p.ops) for p in progs[2:]] == [2 * moe, 2 * moe]  # one call per MoE layer and lane
    last = placement.owner[-1]
    assert all(progs[last].sends[r] == (DRIVER,) for r in results)  # the lanes' results go to the driver
    for p in progs:
        # every output leaves for another process or stays with a later call of this one
        assert all(DRIVER in d or all(x != p.actor for x in d) for d in p.sends.values())
        # a lane's StepMsg reaches only mixers, and each program's calls keep the wiring order
        assert [op.node for op in p.ops] == sorted(op.node for op in p.ops)
    assert {op.actor for op in ops if Ref(-1, 1) in op.args} == set(range(len(placement.mixers)))


ray_session = ray_session_fixture(num_cpus=8, autouse=False)


@pytest.fixture(scope="module")
def cluster(ray_session, hf_next_dir):
    ex = ClusterExecutor(hf_next_dir, dtype="float32", num_slots=4, max_model_len=64,
                         config=NextserveConfig.from_args({"cluster": {"step_timeout_s": 20}}))
    yield ex
    ex.shutdown()


def _fail(worker, *args):
    raise ValueError("injected failure in this shard")


def _inject(worker, how: str):
    if how == "raise":
        worker.run = _fail.__get__(worker)
    elif how == "die":
        worker.run = lambda *args: os._exit(1)
    elif how == "hang":
        worker.run = lambda *args: time.sleep(6)
    else:
        del worker.run
    return True


def actor(ex: ClusterExecutor, name: str):
    return dict(zip(ex.actor_names(), ex.actors.actors, strict=True))[name]


def same_as_local(ex: ClusterExecutor, model_dir: str) -> None:
    ref = LocalExecutor(model_dir, dtype="float32", num_slots=4, max_model_len=64)
    got, want = ex.execute(PREFILL), ref.execute(PREFILL)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))


def test_sockets_are_the_default_and_match_local(cluster, hf_next_dir):
    assert isinstance(cluster._step, SocketStep) and cluster.idle_after_s is None
    same_as_local(cluster, hf_next_dir)


def test_an_exception_in_an_actor_reaches_the_driver_with_its_text(cluster, hf_next_dir):
    shard = actor(cluster, "experts-1")
    ray.get(shard.__ray_call__.remote(_inject, "raise"), timeout=30)
    try:
        with pytest.raises(DataPlaneActorError, match="experts-1: ValueError: injected failure in this"):
            cluster.execute(PREFILL)
    finally:
        ray.get(shard.__ray_call__.remote(_inject, "restore"), timeout=30)
    assert cluster.state is State.RUNNING and cluster.num_recoveries == 0  # nothing died
    same_as_local(cluster, hf_next_dir)  # the aborted step left nothing behind on the plane


def test_an_actor_dying_mid_step_is_noticed_at_once_and_restarted(cluster, hf_next_dir):
    shard = actor(cluster, "experts-0")
    ray.get(shard.__ray_call__.remote(_inject, "die"), timeout=30)
    start = time.monotonic()
    with pytest.raises(ExecutorStateLostError, match="PeerLostError") as e:
        cluster.execute(PREFILL)
    assert e.value.recovered and cluster.num_recoveries == 1
    assert "experts-0" in cluster.last_recovery_detail
    # noticed by its closed connection, not by the step timeout (20 s); the restart is the rest
    assert time.monotonic() - start - cluster.last_recovery_s < 5
    assert shard not in cluster.actors.actors
    same_as_local(cluster, hf_next_dir)


def test_an_actor_that_does_not_answer_times_the_step_out_and_the_step_is_rebuilt(cluster, hf_next_dir):
    shard = actor(cluster, "experts-1")
    ray.get(shard.__ray_call__.remote(_inject, "hang"), timeout=30)
    before = cluster.num_recoveries
    cluster._step.timeout_s = 2.0  # cluster.step_timeout_s, shortened for this step only
    start = time.monotonic()
    try:
        with pytest.raises(ExecutorStateLostError, match="GetTimeoutError: data plane: step"):
            cluster.execute(PREFILL)
    finally:
        ray.get(shard.__ray_call__.remote(_inject, "restore"), timeout=30)
    # the timeout, then the rebuild waits (bounded) for the stuck call to leave the old plane
    assert time.monotonic() - start < 2.0 + 20
    assert cluster.num_recoveries == before + 1 and "(none dead)" in cluster.last_recovery_detail
    same_as_local(cluster, hf_next_dir)


def _short_stop(worker, seconds: float):
    import cluster.dataplane
    cluster.dataplane.STOP_S = seconds  # this actor's process only
    return True


def test_an_actor_stuck_in_a_call_past_the_stop_is_replaced(cluster, hf_next_dir):
    """A loop that cannot leave its call must not run beside the next plane's on the same caches:
    the actor is killed at teardown and restarted by the recovery."""
    shard = actor(cluster, "experts-0")
    ray.get([shard.__ray_call__.remote(_short_stop, 0.5), shard.__ray_call__.remote(_inject, "hang")],
            timeout=30)
    before = cluster.num_recoveries
    cluster._step.timeout_s = 2.0
    with pytest.raises(ExecutorStateLostError, match="GetTimeoutError"):
        cluster.execute(PREFILL)
    assert cluster.num_recoveries == before + 1 and "experts-0" in cluster.last_recovery_detail
    assert shard not in cluster.actors.actors
    same_as_local(cluster, hf_next_dir)
