"""Joining a Ray cluster (or starting a local one, stopped again on shutdown) and reserving the
pools' resources as placement groups, after checking that some node can give them."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group

from cluster.config import Pools
from cluster.placement import ClusterPlacement, check_resources
from engine.config import NextserveConfigError

log = logging.getLogger(__name__)
REPO_ROOT = str(Path(__file__).resolve().parents[1])


@dataclass
class RaySession:
    """What this process started in Ray, so that shutdown removes exactly that."""

    started_ray: bool
    groups: dict[str, PlacementGroup] = field(default_factory=dict)

    def remove_groups(self) -> None:
        """Free the placement groups reserved so far."""
        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception as e:  # Ray already gone: nothing left to free
                log.debug("placement group removal failed: %s", e)
        self.groups.clear()

    def shutdown(self) -> None:
        self.remove_groups()
        if self.started_ray and ray.is_initialized():
            ray.shutdown()


def connect(address: str | None, pools: Pools) -> RaySession:
    """Use the Ray this process is already in (a Serve replica, a test); else join `address` or
    $RAY_ADDRESS (set by `ray job submit`); else start a local cluster with enough logical CPUs for
    every pool's actors. Not Ray's "auto" discovery: it finds any gcs_server in the process table,
    also one in another network namespace, and then waits on an address it cannot reach."""
    if ray.is_initialized():
        return RaySession(started_ray=False)
    # Workers import nextserve's packages from the repo root, wherever they were started.
    runtime_env = {"env_vars": {"PYTHONPATH": REPO_ROOT}}
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is not None:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        except ConnectionError as e:
            raise NextserveConfigError(f"cluster.ray_address: no Ray cluster at {address!r} ({e})") from None
        return RaySession(started_ray=False)
    need = sum(p.actors * p.resources.num_cpus for p in (pools.attention, pools.deltanet, pools.experts))
    start_local_ray(max(int(need + 0.999), os.cpu_count() or 1), runtime_env)
    return RaySession(started_ray=True)


def start_local_ray(num_cpus: int, runtime_env: dict) -> None:
    """A one-machine Ray cluster whose every port (GCS, raylet, object manager, workers, agents)
    listens on loopback only: whoever reaches a Ray port can run code on the machine.

    Ray takes the node's address for the one other nodes would reach it at, and binds to it and
    to all interfaces; `_node_ip_address="127.0.0.1"` is turned back into that address. What
    makes Ray keep to loopback is the setting it uses where clusters are off (macOS, Windows),
    read when it picks the node's address, so it is set for the duration of the start only."""
    from ray._private import ray_constants

    saved = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, runtime_env=runtime_env,
                 log_to_driver=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved


def reserve(session: RaySession, pools: Pools, placement: ClusterPlacement, timeout_s: float) -> None:
    """One placement group per pool in use, a bundle per actor."""
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    check_resources(pools, placement, nodes)
    counts = {"attention": sum(m.pool == "attention" for m in placement.mixers),
              "deltanet": sum(m.pool == "deltanet" for m in placement.mixers),
              "experts": placement.num_shards}
    for name, n in counts.items():
        if n == 0:
            continue
        pool = getattr(pools, name)
        # A bundle may not be empty; a zero-CPU actor still gets a tiny CPU reservation.
        bundle = pool.resources.as_bundle() or {"CPU": 0.001}
        labels = [dict(pool.label_selector) for _ in range(n)] if pool.label_selector else None
        session.groups[name] = placement_group([dict(bundle) for _ in range(n)], strategy=pool.strategy,
                                               bundle_label_selector=labels)
    for name, pg in session.groups.items():
        try:
            ray.get(pg.ready(), timeout=timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise NextserveConfigError(f"pools.{name}: the cluster could not place {counts[name]} actors "
                                       f"({pools.__getattribute__(name).strategy}) within {timeout_s}s; "
                                       f"are other jobs holding the resources?") from None
