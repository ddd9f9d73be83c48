"""engine/cpu_runtime.py: the allocator setting takes on glibc, and flushing denormals is a
per-thread setting that the local executor makes for the duration of each step, in the thread
that runs it, leaving the thread as it found it."""

import ctypes.util
import platform
import threading

import pytest
import torch

from engine.cpu_runtime import flushes_denormals, keep_freed_memory
from engine.executor import StepInput
from engine.local_executor import LocalExecutor

X86 = platform.machine() in ("x86_64", "AMD64")


def in_thread(fn):
    """fn's result, run in a fresh thread (which starts with this thread's float environment)."""
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join(timeout=60)
    return out[0]


def denormal_product() -> float:
    """1e-20 · 1e-20 = 1e-40, below float32's smallest normal number (~1.2e-38)."""
    return float(torch.tensor([1e-20]) * torch.tensor([1e-20]))


def test_keep_freed_memory_on_glibc():
    if platform.system() != "Linux" or "libc.so.6" not in (ctypes.util.find_library("c") or ""):
        pytest.skip("mallopt is glibc's")
    assert keep_freed_memory() is True
    assert keep_freed_memory() is True  # once per process; calling again is harmless


class Device:
    def __init__(self, kind: str) -> None:
        self.device = torch.device(kind)

    @flushes_denormals
    def compute(self) -> float:
        return denormal_product()


@pytest.mark.skipif(not X86, reason="flush-to-zero is an x86 SSE setting")
def test_flushes_denormals_during_the_call_and_restores_the_thread():
    def outer() -> tuple[float, float, float]:
        torch.set_flush_denormal(False)  # a thread starts with its creator's setting
        return denormal_product(), Device("cpu").compute(), denormal_product()

    before, during, after = in_thread(outer)
    assert before > 0 and during == 0.0 and after > 0
    assert in_thread(lambda: (torch.set_flush_denormal(False), Device("meta").compute())[1]) > 0  # not CPU


@pytest.mark.skipif(not X86, reason="flush-to-zero is an x86 SSE setting")
def test_local_executor_flushes_during_its_steps(tmp_path):
    from model.tiny import make_tiny_model

    executor = LocalExecutor(make_tiny_model(tmp_path / "tiny"), num_slots=1, max_model_len=16)
    step = StepInput(token_ids=(5, 9, 13), slots=(0,), starts=(0,), lengths=(3,), logits_index=(2,))
    seen: list[float] = []
    compute_logits = executor.model.compute_logits

    def recording(hidden):
        seen.append(denormal_product())
        return compute_logits(hidden)

    executor.model.compute_logits = recording

    def run_step() -> float:
        torch.set_flush_denormal(False)
        executor.execute(step)
        return denormal_product()

    assert in_thread(run_step) > 0  # the thread as it was
    assert seen == [0.0]  # flushed inside the step
