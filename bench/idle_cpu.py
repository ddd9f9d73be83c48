"""What an idle cluster executor costs the machine: cores busy (from /proc/stat, whole machine, so
run it on an otherwise quiet one) while the compiled graph stands idle, after `idle()` tears it
down, and how long the first step after the pause takes (the graph compiled again).

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


def cores_busy(seconds: float = 5.0) -> float:
    def snapshot() -> tuple[int, int]:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
        return sum(ticks), ticks[3] + ticks[4]  # all, idle + iowait

    total0, idle0 = snapshot()
    time.sleep(seconds)
    total1, idle1 = snapshot()
    return (os.cpu_count() or 1) * (1 - (idle1 - idle0) / (total1 - total0))


def main() -> None:
    root = str(Path(__file__).resolve().parents[1])
    with tempfile.TemporaryDirectory() as tmp:
        model = make_tiny_model(Path(tmp) / "tiny")
        ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": root}})
        ex = ClusterExecutor(model, dtype="float32", num_slots=4, max_model_len=64, config=NextserveConfig())
        try:
            ex.execute(StepInput((3, 4, 5), (0,), (0,), (3,), (2,)))
            time.sleep(2)
            print(f"compiled graph standing, no steps: {cores_busy():.2f} cores busy")
            ex.idle()
            time.sleep(2)
            print(f"after idle(): {cores_busy():.2f} cores busy")
            t = time.perf_counter()
            ex.execute(StepInput((6,), (0,), (3,), (1,), (0,)))
            print(f"first step after the pause (compile + step): {time.perf_counter() - t:.2f} s")
        finally:
            ex.shutdown()
            ray.shutdown()


if __name__ == "__main__":
    main()
