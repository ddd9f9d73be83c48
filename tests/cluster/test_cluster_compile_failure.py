"""`engine.compile` with the cluster executor where compiling fails in the actors: no C++ compiler
(CXX=/nonexistent in every Ray worker, with an empty inductor cache so that no graph compiled
before is found). The first decode step's warm-up fails on every actor; each failure is logged
naming the actor and the bucket, compile goes off for the executor as a whole (every actor runs
every step eagerly, consistently), no actor is restarted, and the steps give the local eager
executor's logits; an actor restarted later starts eager too.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest \
        tests/cluster/test_cluster_compile_failure.py'"""

from __future__ import annotations

import logging

import pytest

ray = pytest.importorskip("ray")

from cluster.executor import ClusterExecutor  # noqa: E402
from deployments.config import NextserveConfig  # noqa: E402
from engine.executor import ExecutorStateLostError  # noqa: E402
from engine.local_executor import LocalExecutor  # noqa: E402
from tests.cluster.test_compiled_workers import assert_close_logits, steps  # noqa: E402
from tests.ray_fixtures import ray_session_fixture  # noqa: E402

SIZES = dict(dtype="float32", num_slots=4, max_model_len=64, block_size=8, num_kv_blocks=32)
CLUSTER = {"cluster": {"timeout_s": 600, "step_timeout_s": 60}}  # the default data plane, sockets


ray_session = ray_session_fixture(num_cpus=8, env=lambda tmp: {
    "CXX": "/nonexistent", "TORCHINDUCTOR_CACHE_DIR": str(tmp.mktemp("inductor"))})


def eager_actors(cluster: ClusterExecutor) -> list[bool]:
    """Per actor, whether it runs every step eagerly. Asked by plain calls: the step goes back to
    the sockets data plane afterwards."""
    cluster.configure_step(data_plane="remote_calls")
    eager = ray.get([a.__ray_call__.remote(lambda w: w.decode is None) for a in cluster.actors.actors],
                    timeout=60)
    cluster.configure_step(data_plane="sockets")
    return eager


def test_a_compile_that_fails_in_the_actors_leaves_every_actor_eager(hf_next_dir, caplog):
    config = NextserveConfig.from_args({**CLUSTER, "pools": {"experts": {"actors": 2}}})
    cluster = ClusterExecutor(hf_next_dir, config=config, compile=True, **SIZES)
    try:
        local = LocalExecutor(hf_next_dir, **SIZES)
        assert eager_actors(cluster) == [False] * 4
        with caplog.at_level(logging.WARNING, logger="cluster.executor"):
            for i, step in enumerate(steps()):
                assert_close_logits(cluster.execute(step), local.execute(step), f"step {i}")
        failed = [r.getMessage() for r in caplog.records if "failed to compile decode batch bucket 4" in
                  r.getMessage() and r.getMessage().startswith("cluster actor ")]
        named = {m.split()[2] for m in failed}
        assert named == {"attention-0", "deltanet-0", "experts-0", "experts-1"}, failed
        assert all("C++ compiler" in m for m in failed), failed
        assert cluster.num_recoveries == 0  # no restart, let alone a loop of them
        assert cluster.compiled_buckets() == ((), False) and cluster.decode_buckets == ()
        assert "failed to compile decode batch bucket 4" in cluster.compile_error()
        assert eager_actors(cluster) == [True] * 4
        # An actor restarted after that starts without compile, like the others.
        ray.kill(cluster.actors.mixers[1])
        with pytest.raises(ExecutorStateLostError):
            cluster.execute(steps()[2])
        assert cluster.num_recoveries == 1 and eager_actors(cluster) == [True] * 4
        local = LocalExecutor(hf_next_dir, **SIZES)
        for i, step in enumerate(steps()):  # recomputed from the start, as the engine would
            assert_close_logits(cluster.execute(step), local.execute(step), f"after the restart, step {i}")
        assert cluster.num_recoveries == 1
    finally:
        cluster.shutdown()
