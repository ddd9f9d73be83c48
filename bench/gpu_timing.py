"""What bench/gpu_check.py measures with: a time budget, median timings with the device synced,
the device's copy bandwidth (the HBM floor's divisor) and the software and device it ran on."""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from model import kernels


class Clock:
    """Elapsed seconds since the start, and whether the budget allows another section."""

    def __init__(self, budget_s: float) -> None:
        self.start, self.budget_s, self.skipped = time.perf_counter(), budget_s, []

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, what: str) -> bool:
        if self.elapsed() < self.budget_s:
            return True
        self.skipped.append(what)
        print(f"[{self.elapsed():6.1f}s] budget spent: skipping {what}", flush=True)
        return False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> float:
    """Median seconds of `fn` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device) -> float:
    """Bytes per second a device-to-device copy moves, counting bytes read and written."""
    n = (1 << 30) if device.type == "cuda" else (32 << 20)
    src = torch.empty(n, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * n / timed(lambda: dst.copy_(src), device, repeats=5)


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version(),
                           "device": str(device), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = list(torch.cuda.get_device_capability(device))
    for pkg in ("fla", "triton", "transformers"):
        try:
            env[pkg] = __import__(pkg).__version__
        except Exception as e:  # absent, or fails to import without a GPU
            env[pkg] = f"not importable ({type(e).__name__})"
    env["fla_kernels"] = kernels.fla_ops() is not None
    env["fla_import_error"] = kernels.fla_import_error()
    return env
