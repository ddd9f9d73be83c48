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
  its creator's): the thread that runs the steps sets it."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging

import torch

log = logging.getLogger(__name__)

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


def flush_denormals() -> bool:
    """Flush denormal floats to zero in the calling thread (SSE3 CPUs); cheap enough to call
    before every step. False where the CPU does not support it."""
    return torch.set_flush_denormal(True)
