"""Compiled decode: a step in which every sequence brings one new token, run as groups of
consecutive layers captured with torch.compile (or, on CUDA, each bucket's whole step as a CUDA
graph) for a set of batch-size buckets. Eager (model/decoder.py) stays the fallback for other
steps and the reference the tests hold this path to.

A step of B sequences is padded up to the next bucket Bp. Padded rows must never touch a real
sequence's cache, so the caches get scratch room (`make_decode_caches`): one extra DeltaNet
state slot and one extra KV-cache block, which only padded rows read and write. The context
length is a dynamic dimension of the compiled graphs (padded to a multiple of `KV_GRANULE`), so
a bucket compiles once per distinct group of layers (once for Qwen3-Next's 3:1 pattern),
whatever the sequences' lengths.

`CompiledDecode` runs a whole model's step (the local executor); model/compiled_actor.py's
`CompiledLayers` runs one layer per call for a cluster actor that holds a few (its mixer half,
gate and shared expert: the routed experts live in other actors). Both pad through
`DecodePadding` and compile lazily through `LazyCompiles`; the math they compile is
model/decode_math.py's.

Legend: B sequences, Bp bucket, H hidden, Lk keys read per row, N / Nkv query / key-value heads,
D head dim, G / Hv DeltaNet key / value heads, K / V their head dims, C conv channels, W conv
kernel, k experts per token, I expert intermediate size."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import fields

import torch
import torch.nn.functional as F
from torch import Tensor

from model.batch import BatchLayout
from model.cache import DeltaNetState, KVCache
from model.decode_math import (
    KV_GRANULE,
    DecodeInputs,
    LayersFn,
    compile_layers_fn,
    default_buckets,
    state_tensors,
)
from model.decoder import Cache, CausalLM

log = logging.getLogger(__name__)

# Layers per compiled graph: fewer calls (each costs guards and wrappers, ~0.1 ms on CPU) against
# a longer compile; 4 is one 3:1 DeltaNet/attention period of Qwen3-Next, so all groups share a graph.
LAYERS_PER_GRAPH = 4
RECOMPILE_ROOM = 64


# One bucket's step: h [Bp, hidden] and the padded inputs -> (h, each layer's expert ids [Bp, k] or None).
StepFn = Callable[[Tensor, DecodeInputs], tuple[Tensor, list[Tensor | None]]]


class DecodeCompileError(RuntimeError):
    """Compiling (or capturing) batch bucket `bucket` raised `__cause__` (no C++ compiler, an
    inductor error). It ran on scratch rows only, so every sequence's state is as it was: the
    step can run eagerly instead."""

    def __init__(self, bucket: int) -> None:
        super().__init__(f"compiling the decode step for batch bucket {bucket} failed")
        self.bucket = bucket


class CudaGraphStep:
    """One bucket's step captured as a CUDA graph (vLLM's per-batch-size capture): replays read
    static input buffers, into which each call copies the step's inputs, so the key width must
    be fixed (`CompiledDecode` pads to the cache's max_len). Captured on scratch-only inputs, so
    warming up and capturing touch no sequence's cache. The outputs are static too: the next
    replay overwrites them, so a caller copies what it keeps. `pool`: a memory pool shared by
    the buckets' graphs (replayed one at a time), as vLLM shares one. CUDA only:
    tests/model/test_kernels_gpu.py runs it against eager; tests/model/test_compiled.py runs
    the same fixed-width inputs on CPU without the graph."""

    def __init__(self, step: StepFn, h: Tensor, scratch: DecodeInputs, pool: object | None = None) -> None:
        self.h, self.inputs = h.clone(), scratch
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):  # compiles the graphs and lets the allocator settle before capture
                step(self.h, self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.out = step(self.h, self.inputs)

    def __call__(self, h: Tensor, inputs: DecodeInputs) -> tuple[Tensor, list[Tensor | None]]:
        self.h.copy_(h)
        for f in fields(DecodeInputs):
            static, new = getattr(self.inputs, f.name), getattr(inputs, f.name)
            if static.shape != new.shape:  # a copy would broadcast silently, or fail inside replay
                raise ValueError(f"CUDA graph input {f.name}: shape {tuple(new.shape)}, captured "
                                 f"{tuple(static.shape)}")
            static.copy_(new)
        self.graph.replay()
        return self.out


class DecodePadding:
    """Decode steps padded up to batch buckets over caches with scratch room (`make_decode_caches`,
    for `num_slots` slots and `num_blocks` KV blocks): which steps qualify (`supports`), their
    bucket and padded `DecodeInputs`. `caches`: any of a model's layers' caches (all of them, or a
    cluster actor's few); `kv_width`: every step's keys padded to this width (None: to the step's
    longest context, rounded up to `KV_GRANULE`)."""

    def __init__(self, caches: Sequence[Cache], num_slots: int, num_blocks: int,
                 buckets: Sequence[int] | None = None, kv_width: int | None = None) -> None:
        self.buckets = tuple(sorted(set(buckets or default_buckets(num_slots))))
        if self.buckets[0] < 1:
            raise ValueError(f"batch buckets must be >= 1, got {self.buckets}")
        for c in caches:
            if isinstance(c, DeltaNetState) and c.conv.shape[0] <= num_slots:
                raise ValueError("caches without a scratch state slot: build them with make_decode_caches")
            if isinstance(c, KVCache) and c.num_blocks <= num_blocks:
                raise ValueError("caches without a scratch KV block: build them with make_decode_caches")
        self.kv_cache = next((c for c in caches if isinstance(c, KVCache)), None)
        self.scratch_slot = num_slots
        self.scratch_row = num_blocks * (self.kv_cache.block_size if self.kv_cache else 1)
        self.kv_width = kv_width

    def supports(self, layout: BatchLayout) -> bool:
        """One new token per sequence, at most the largest bucket of them, and no states kept for
        speculative decoding's rollback (a verify step of one token per sequence runs eagerly)."""
        return layout.is_decode and layout.num_seqs <= self.buckets[-1] and not layout.keep_states

    def bucket(self, num_seqs: int) -> int:
        return next(b for b in self.buckets if b >= num_seqs)

    def _keys_width(self, lk: int) -> int:
        return self.kv_width or -(-lk // KV_GRANULE) * KV_GRANULE

    def inputs(self, layout: BatchLayout, bucket: int) -> DecodeInputs:
        """The step's rows padded to `bucket`; the KV rows come from the cache's own checked index."""
        B = layout.num_seqs
        pad = bucket - B

        def padded(t: Tensor, value: int | bool) -> Tensor:
            # A new tensor even without padding: made here (in inference mode) like the padded ones,
            # it passes the same guards, so a full bucket runs the same graph.
            return F.pad(t, (0, pad), value=value)

        if self.kv_cache is None:  # no attention layer reads them
            write_at = torch.full((B,), self.scratch_row, device=layout.slots.device)
            read_at = torch.full((B, 1), self.scratch_row, device=layout.slots.device)
        else:
            write_at, read_at = self.kv_cache.rows(layout)  # [B], [B, Lk]
        lk = read_at.shape[1]
        return DecodeInputs(
            positions=padded(layout.positions, 0),
            slots=padded(layout.slots, self.scratch_slot),
            fresh=padded(layout.starts == 0, True),
            write_at=padded(write_at, self.scratch_row),
            read_at=F.pad(read_at, (0, self._keys_width(lk) - lk, 0, pad), value=self.scratch_row),
            kv_len=padded(layout.positions + 1, 1),
        )

    def step_inputs(self, slots: Sequence[int], starts: Sequence[int], block_tables: Sequence[Sequence[int]],
                    bucket: int, device: torch.device | str) -> DecodeInputs:
        """`inputs` for a decode step given as the engine's lists (sequence b in `slots[b]`, its
        token at position `starts[b]`, its KV blocks `block_tables[b]`), without a BatchLayout:
        built from Python lists in a few tensor calls (at batch 32: ~60 µs against ~300 µs for
        BatchLayout.build and `inputs`, a tenth of the compiled step). Each real row's table is
        checked as the cache checks it (enough blocks for its tokens, ids inside the cache), for a
        bad one would write into another sequence's blocks. Keys past a row's end read the scratch
        row, masked by kv_len."""
        kv = self.kv_cache
        if kv is None:
            raise ValueError("step_inputs needs an attention layer's KV cache; use inputs(layout)")
        B, pad, bs = len(slots), bucket - len(slots), kv.block_size
        if len(set(slots)) != B:
            raise ValueError(f"a slot appears twice in one step: {list(slots)}")
        end = max(starts) + 1
        width = -(-end // bs)  # blocks the longest row reads
        scratch_block = self.scratch_row // bs  # the engine's block ids are below it
        rows: list[Sequence[int]] = []
        for b, (t, start) in enumerate(zip(block_tables, starts, strict=True)):
            need = start // bs + 1
            if len(t) < need:
                raise ValueError(f"sequence {b} of the step has {start + 1} tokens, more than its block "
                                 f"table of {len(t)} blocks of {bs} tokens holds")
            if min(t[:need]) < 0 or max(t[:need]) >= scratch_block:
                raise ValueError(f"block ids {list(t[:need])} outside the cache's 0..{scratch_block - 1}")
            rows.append(t[:need] if need >= width else [*t[:need], *[0] * (width - need)])
        rows += [[scratch_block] * width] * pad
        table = torch.tensor(rows, dtype=torch.long, device=device)  # [Bp, width]
        positions = torch.tensor([*starts, *[0] * pad], dtype=torch.long, device=device)  # [Bp]
        kv_len = positions + 1
        p = torch.arange(self._keys_width(end), device=device)  # [Lk]
        at = table[:, (p // bs).clamp(max=width - 1)] * bs + p % bs  # [Bp, Lk]
        read_at = torch.where(p[None, :] < kv_len[:, None], at, self.scratch_row)
        return DecodeInputs(
            positions=positions,
            slots=torch.tensor([*slots, *[self.scratch_slot] * pad], dtype=torch.long, device=device),
            fresh=torch.tensor([s == 0 for s in starts] + [True] * pad, device=device),
            write_at=read_at.gather(1, positions[:, None])[:, 0],
            read_at=read_at,
            kv_len=kv_len,
        )

    def scratch_inputs(self, bucket: int, device: torch.device | str) -> DecodeInputs:
        """A step of padded rows only: it reads and writes nothing but the scratch slot and block."""
        def full(value: int | bool, *shape: int) -> Tensor:
            return torch.full(shape or (bucket,), value, device=device)

        return DecodeInputs(positions=full(0), slots=full(self.scratch_slot), fresh=full(True),
                            write_at=full(self.scratch_row),
                            read_at=full(self.scratch_row, bucket, self._keys_width(1)), kv_len=full(1))


class LazyCompiles:
    """Compiles made on first use, each timed and logged: `first(key, what)` wraps a key's first
    run (its graphs compile there), `trusted()` every later one. `seconds`: key -> its first run."""

    def __init__(self) -> None:
        self.seconds: dict[Hashable, float] = {}

    def __contains__(self, key: Hashable) -> bool:
        return key in self.seconds

    @contextmanager
    def first(self, key: Hashable, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        # A first run adds graphs to those of the other buckets (and of other instances in this
        # process) beyond torch's default of 8; later runs keep the default, which stops an
        # unforeseen recompile loop (torch then runs the code eagerly, with a warning).
        with torch._dynamo.config.patch(recompile_limit=max(torch._dynamo.config.recompile_limit,
                                                            RECOMPILE_ROOM)):
            yield
        seconds = self.seconds[key] = time.perf_counter() - t0
        log.info("compiled %s in %.1f s", what, seconds)

    @staticmethod
    def trusted() -> AbstractContextManager[None]:
        """Full guards cost 0.1-0.3 ms per graph call on CPU (measured: 16-18 % of a 48-layer
        step). After its first run a key has its graphs, and later runs differ only in values and
        the dynamic key width: the same layers, caches and `DecodePadding.inputs`-made tensors of
        the same dtypes and ranks. So only the guards that tell the graphs apart are checked
        (torch's "unsafe" stance: it trusts that nothing else changes; if no graph matches, it
        raises rather than compiling)."""
        return torch.compiler.set_stance(skip_guard_eval_unsafe=True)


class CompiledDecode(DecodePadding):
    """Runs decode steps of `model` over `caches` (from `make_decode_caches`, for `num_slots`
    slots and `num_blocks` KV blocks) through compiled groups of `layers_per_graph` consecutive
    layers; `supports(layout)` says which steps. `layers_fn`: the compiled group, default
    `decode_layers` under torch.compile. `cuda_graphs` (default: on a CUDA device) captures each
    bucket's whole step as a `CudaGraphStep` over a fixed key width; `static_kv_width` (default:
    as `cuda_graphs`) pads every step's keys to that width without the graphs (what the graphs
    replay, checkable on CPU). `record_gate(layer, ids)` receives each MoE layer's expert ids
    [B, k] of the real rows (a copy, not a graph's static output)."""

    def __init__(self, model: CausalLM, caches: Sequence[Cache], num_slots: int, num_blocks: int,
                 buckets: Sequence[int] | None = None, layers_per_graph: int = LAYERS_PER_GRAPH,
                 layers_fn: LayersFn | None = None, cuda_graphs: bool | None = None,
                 record_gate: Callable[[int, Tensor], None] | None = None,
                 static_kv_width: bool | None = None) -> None:
        super().__init__(caches, num_slots, num_blocks, buckets)
        self.model = model
        self.record_gate = record_gate
        layers = list(model.model.layers)
        self.groups = [(tuple(layers[i:i + layers_per_graph]),
                        tuple(state_tensors(c) for c in caches[i:i + layers_per_graph]))
                       for i in range(0, len(layers), layers_per_graph)]
        if cuda_graphs is None:
            cuda_graphs = model.lm_head.weight.device.type == "cuda"
        if cuda_graphs and model.lm_head.weight.device.type != "cuda":
            raise ValueError("cuda_graphs needs the model on a CUDA device")
        self.cuda_graphs = cuda_graphs
        # On CPU the C++ wrapper saves the Python between kernels (on CUDA a graph replays them).
        self.layers_fn = layers_fn or compile_layers_fn(cpp_wrapper=model.lm_head.weight.device.type == "cpu")
        self.graph_pool = torch.cuda.graph_pool_handle() if cuda_graphs else None
        # CUDA graphs replay fixed shapes: every row reads keys up to the cache's max_len.
        max_len = self.kv_cache.max_len if self.kv_cache else 1
        static = cuda_graphs if static_kv_width is None else static_kv_width
        if cuda_graphs and not static:
            raise ValueError("cuda_graphs replay a fixed key width: static_kv_width cannot be False")
        self.kv_width = -(-max_len // KV_GRANULE) * KV_GRANULE if static else None
        self.steps: dict[int, StepFn] = {}  # bucket -> its step, made on its first use
        self.compiles = LazyCompiles()
        # Set by `compile_in_background`: the thread compiling the buckets; until it ends, steps
        # use only buckets already compiled (and run eagerly otherwise).
        self.background: threading.Thread | None = None
        self.background_error: BaseException | None = None
        # The first compile that failed, in the background or on a step's first use of its bucket.
        self.compile_error: BaseException | None = None

    @property
    def compile_seconds(self) -> dict[int, float]:
        """bucket -> seconds its first step took."""
        return self.compiles.seconds  # type: ignore[return-value]

    def supports(self, layout: BatchLayout) -> bool:
        if not super().supports(layout):
            return False
        return not self._ready_only() or any(b >= layout.num_seqs for b in self.steps)

    def bucket(self, num_seqs: int) -> int:
        if self._ready_only():  # the smallest bucket ready that holds the step
            return min(b for b in self.steps if b >= num_seqs)
        return super().bucket(num_seqs)

    @property
    def compiling(self) -> bool:
        """Whether `compile_in_background`'s thread is still compiling buckets."""
        return self.background is not None and self.background.is_alive()

    def _ready_only(self) -> bool:
        """Steps use compiled buckets only, never compile one themselves: while the background
        thread compiles, and after a compile failed."""
        return self.compiling or self.background_error is not None or self.compile_error is not None

    def compile_in_background(self) -> threading.Thread:
        """Compile every bucket in a thread of this process, on scratch-only steps (smallest
        first: a lone request is served compiled soonest), while the caller keeps stepping: a
        decode step uses the smallest bucket compiled so far that holds it, and runs eagerly when
        none does, so serving starts at once and each bucket switches to its graph when that is
        ready (each compile is logged with its seconds; inductor's on-disk cache makes a restart's
        compiles short). A compile that fails is logged and leaves eager in charge of the rest."""
        if self.background is not None:
            raise RuntimeError("the buckets are already compiling in the background")
        device = self.model.lm_head.weight.device
        if self.cuda_graphs:  # a capture must not overlap other work on the device
            raise ValueError("compile_in_background: CUDA graphs are captured with warm_up instead")

        def run() -> None:
            t0 = time.perf_counter()
            try:
                with torch.inference_mode():
                    for bucket in self.buckets:
                        h = torch.zeros(bucket, self.model.config.hidden_size,
                                        dtype=self.model.lm_head.weight.dtype, device=device)
                        self._step(bucket, h, self.scratch_inputs(bucket, device))
                log.info("compiled decode: all %d batch buckets %s ready in %.1f s", len(self.buckets),
                         list(self.buckets), time.perf_counter() - t0)
            except BaseException as e:  # eager keeps serving every step the graphs would have
                self.background_error = e
                log.exception("compiled decode: compiling in the background failed; decode steps "
                              "of the buckets not compiled stay eager")

        self.background = threading.Thread(target=run, name="nextserve-compile", daemon=True)
        self.background.start()
        return self.background

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compile (or capture) every bucket now, on scratch-only steps, rather than on first use;
        largest first, so that the smaller graphs fit in the memory pool the largest made."""
        device = self.model.lm_head.weight.device
        for bucket in sorted(self.buckets, reverse=True):
            if bucket not in self.steps:
                h = torch.zeros(bucket, self.model.config.hidden_size, dtype=self.model.lm_head.weight.dtype,
                                device=device)
                self._step(bucket, h, self.scratch_inputs(bucket, device))

    @torch.inference_mode()
    def __call__(self, token_ids: Tensor, layout: BatchLayout) -> Tensor:
        """token_ids [B] of a decode layout -> final-normed hidden states [B, hidden]."""
        if not self.supports(layout):
            raise ValueError(f"not a decode step of at most {self.buckets[-1]} sequences")
        bucket = self.bucket(layout.num_seqs)
        return self._run(token_ids, bucket, self.inputs(layout, bucket))

    def takes(self, num_seqs: int) -> bool:
        """Whether a decode step of `num_seqs` sequences (one token each, no states kept for
        speculative decoding) runs here: `supports` without a layout."""
        if num_seqs > self.buckets[-1]:
            return False
        return not self._ready_only() or any(b >= num_seqs for b in self.steps)

    @torch.inference_mode()
    def decode_step(self, token_ids: Tensor, slots: Sequence[int], starts: Sequence[int],
                    block_tables: Sequence[Sequence[int]]) -> Tensor:
        """`__call__` for a decode step given as lists (`step_inputs`; `takes(len(slots))` must hold)."""
        if not self.takes(len(slots)):
            raise ValueError(f"not a decode step of at most {self.buckets[-1]} sequences")
        bucket = self.bucket(len(slots))
        return self._run(token_ids, bucket, self.step_inputs(slots, starts, block_tables, bucket,
                                                             token_ids.device))

    def _run(self, token_ids: Tensor, bucket: int, inp: DecodeInputs) -> Tensor:
        B = token_ids.shape[0]
        h = self.model.model.embed_tokens(F.pad(token_ids, (0, bucket - B)))  # [Bp, hidden]
        h, ids = self._step(bucket, h, inp)
        if self.record_gate is not None:
            for i, layer_ids in enumerate(ids):
                if layer_ids is not None:
                    self.record_gate(i, layer_ids[:B].clone())
        return self.model.model.norm(h[:B])

    def _step(self, bucket: int, h: Tensor, inp: DecodeInputs) -> tuple[Tensor, list[Tensor | None]]:
        step = self.steps.get(bucket)
        if step is not None and self.compiling:
            # The unsafe stance below is process-wide: it would make the compiling thread reuse
            # a graph of another bucket instead of compiling its own. Full guards meanwhile.
            return step(h, inp)
        if step is not None:
            with self.compiles.trusted():
                return step(h, inp)
        made = False
        try:
            with self.compiles.first(bucket, f"decode step for batch bucket {bucket}"):
                scratch = self.scratch_inputs(bucket, h.device)
                if self.cuda_graphs:
                    step = CudaGraphStep(self._run_layers, torch.zeros_like(h), scratch, self.graph_pool)
                else:  # compiled on scratch rows: a compile that fails touches no sequence's state
                    step = self._run_layers
                    step(torch.zeros_like(h), scratch)
                made = True
                out = step(h, inp)
        except Exception as e:
            if made:
                raise
            self.compile_error = self.compile_error or e
            raise DecodeCompileError(bucket) from e
        self.steps[bucket] = step  # only now may another thread's steps use it
        return out

    def _run_layers(self, h: Tensor, inp: DecodeInputs) -> tuple[Tensor, list[Tensor | None]]:
        torch._dynamo.mark_static(h, 0)  # one graph per bucket, never a dynamic batch
        if self.kv_width is None:
            torch._dynamo.mark_dynamic(inp.read_at, 1)  # any context length, one graph
        ids: list[Tensor | None] = []
        for layers, states in self.groups:
            h, group_ids = self.layers_fn(layers, h, inp, states)
            ids.extend(group_ids)
        return h, ids
