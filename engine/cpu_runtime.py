"""Process and thread settings for a process that computes steps on CPU (the local executor's, and
the cluster executor's mixer and expert actors on CPU, so both compute the same numbers).
Both are measured on a prefill of 32 prompts of 32 tokens (1024 tokens, the hd64 tiny model,
float32, one thread: README "Serving"), and neither changes what the model computes beyond
values below float32's smallest normal number (~1.2e-38).

- glibc's malloc serves an allocation above its mmap threshold (128 kB, raised dynamically up
  to 32 MB) with a fresh mmap, and gives freed memory at the heap's top back to the kernel past
  its trim threshold: every step's activations then come back as new pages, each a page fault
  (40k faults, 30 % of the prefill step). Keeping freed memory in the process, as tcmalloc
  (which vLLM's CPU backend preloads) does, removes them; the process holds on to its peak
  activation memory instead.
- Denormal floats (|x| < 1.2e-38) take microcode assists on x86, ~100x a normal multiply. The
  chunked delta rule makes many: exp of Qwen3-Next's strongly negative log-decays over a chunk.
  Flushing them to zero, as TensorFlow's CPU runtime does in its compute threads, made the same
  step 25 % faster. The setting is per thread (the MXCSR register; a new thread starts with
  its creator's): each step (or actor call) sets it for its own duration in the thread that
  runs it, and clears it again (`flushes_denormals`)."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# The largest mmap threshold glibc accepts on 64-bit (HEAP_MAX_SIZE / 2): allocations below it
# come from the heap and are reused; larger ones (weights, KV caches) stay mmaps of their own.
MMAP_THRESHOLD_BYTES = 32 << 20
# Freed memory at the heap's top that stays in the process rather than going back to the kernel.
TRIM_THRESHOLD_BYTES = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc's malloc reuse freed step memory instead of unmapping and faulting it back in
    (once per process). False where the C library is not glibc (musl, macOS): nothing changes."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
    if not ok:
        log.warning("mallopt refused the allocator settings; steps keep paying page faults")
    return ok


def flushes_denormals(method: Callable[..., T]) -> Callable[..., T]:
    """For a method of an object with a `device`: on CPU the call runs with denormals flushed to
    zero in its thread, which it leaves as it found it: the setting is per thread and a thread
    starts with it off, so whatever else runs in the caller's thread (an application embedding
    the engine, a test's floating-point checks) keeps IEEE subnormals. Two register writes, ~0.1 µs."""

    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> T:
        if self.device.type != "cpu" or not torch.set_flush_denormal(True):  # False: no such mode
            return method(self, *args, **kwargs)
        try:
            return method(self, *args, **kwargs)
        finally:
            torch.set_flush_denormal(False)

    return call
