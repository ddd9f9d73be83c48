"""What an idle cluster executor costs the machine, per data plane: CPU the actor processes and
the driver burn over 5 s while no step runs (from /proc/<pid>/stat, so other work on the machine
does not count), for the sockets data plane (blocking reads: nothing to release) and for a
standing compiled graph (its actors poll their channels) and the same after `idle()` tore it down;
and how long the first step after the pause takes (the graph compiled again).

    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m bench.idle_cpu'

(Ray starts here, so run it in a loopback-only network namespace as above.)"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import ray

from cluster.executor import ClusterExecutor
from deployments.config import NextserveConfig
from engine.executor import StepInput
from model.tiny import make_tiny_model

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _pid(worker: object) -> int:
    return os.getpid()


def cpu_s(pids: list[int]) -> float:
    """User + system seconds the processes `pids` have used so far."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total * TICK_S


def cores_busy(pids: list[int], seconds: float = 5.0) -> float:
    before = cpu_s(pids)
    time.sleep(seconds)
    return (cpu_s(pids) - before) / seconds


def main() -> None:
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny")
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root}})
        ex = ClusterExecutor(model, dtype="float32", num_slots=4, max_model_len=64, config=NextserveConfig())
        try:
            actors = ray.get([a.__ray_call__.remote(_pid) for a in ex.actors.actors], timeout=60)
            pids, n = [*actors, os.getpid()], len(actors)
            ex.execute(StepInput((3, 4, 5), (0,), (0,), (3,), (2,)))
            time.sleep(2)
            print(f"sockets data plane standing, no steps: {cores_busy(pids):.3f} cores "
                  f"({n} actors + driver)")
            ex.configure_step(data_plane="compiled_graph")
            ex.execute(StepInput((6,), (0,), (3,), (1,), (0,)))
            time.sleep(2)
            print(f"compiled graph standing, no steps: {cores_busy(pids):.3f} cores")
            ex.idle()
            time.sleep(2)
            print(f"compiled graph after idle(): {cores_busy(pids):.3f} cores")
            t = time.perf_counter()
            ex.execute(StepInput((7,), (0,), (4,), (1,), (0,)))
            print(f"first step after the pause (compile + step): {time.perf_counter() - t:.2f} s")
        finally:
            ex.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
