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

`CompiledDecode` runs a whole model's step (the local executor); `CompiledLayers` runs one layer
per call for a cluster actor that holds a few (its mixer half, gate and shared expert: the routed
experts live in other actors). Both pad through `DecodePadding` and compile lazily through
`LazyCompiles`.

Legend: B sequences, Bp bucket, H hidden, Lk keys read per row, N / Nkv query / key-value heads,
D head dim, G / Hv DeltaNet key / value heads, K / V their head dims, C conv channels, W conv
kernel, k experts per token, I expert intermediate size."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, fields
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention import Attention
from model.batch import BatchLayout
from model.cache import DeltaNetState, KVCache
from model.decoder import Cache, CausalLM, DecoderLayer
from model.delta_rule import gated_delta_rule_step
from model.gated_deltanet import GatedDeltaNet, l2norm
from model.kernels import decode_attention_backend, decode_moe_backend
from model.moe import Experts, SparseMoeBlock

log = logging.getLogger(__name__)

KV_GRANULE = 16  # keys read per row are padded to a multiple of this (never a size-1 dimension)
# Layers per compiled graph: fewer calls (each costs guards and wrappers, ~0.1 ms on CPU) against
# a longer compile; 4 is one 3:1 DeltaNet/attention period of Qwen3-Next, so all groups share a graph.
LAYERS_PER_GRAPH = 4
RECOMPILE_ROOM = 64


def default_buckets(max_batch: int) -> tuple[int, ...]:
    """Powers of two below `max_batch`, and `max_batch` itself (vLLM's capture sizes, smaller)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return (*sizes, max_batch)


def make_decode_caches(model: CausalLM, num_slots: int, max_len: int, block_size: int,
                       num_blocks: int) -> list[Cache]:
    """The caches of `model.make_caches` with the scratch room padded rows use: DeltaNet state
    slot `num_slots` and KV-cache block `num_blocks`, both outside what the engine hands out."""
    p = model.lm_head.weight
    return [make_decode_cache(layer, num_slots, max_len, p.dtype, p.device, block_size, num_blocks)
            for layer in model.model.layers]


def make_decode_cache(layer: DecoderLayer, num_slots: int, max_len: int, dtype: torch.dtype,
                      device: torch.device | str, block_size: int, num_blocks: int | None) -> Cache:
    """`layer.make_cache` with the scratch room (`make_decode_caches`), for one layer (a cluster
    actor's). `num_blocks` None: as `make_cache`, every slot at `max_len`, then the scratch block."""
    if isinstance(layer.mixer, Attention):
        if num_blocks is None:
            num_blocks = num_slots * -(-max_len // block_size)
        return layer.make_cache(num_slots, max_len, dtype, device, block_size, num_blocks + 1)
    return layer.make_cache(num_slots + 1, max_len, dtype, device)


@dataclass(frozen=True)
class DecodeInputs:
    """One decode step padded to its bucket: what every layer reads besides its cache."""

    positions: Tensor  # [Bp] long: position of each row's token (0 for padded rows)
    slots: Tensor      # [Bp] long: DeltaNet state slot; the scratch slot for padded rows
    fresh: Tensor      # [Bp] bool: the state starts from zeros (a one-token prompt, a padded row)
    write_at: Tensor   # [Bp] long: KV-cache row of the new key/value; the scratch row for padded rows
    read_at: Tensor    # [Bp, Lk] long: KV-cache rows of each row's keys; the scratch row past its end
    kv_len: Tensor     # [Bp] long: keys each row attends to (position + 1; 1 for padded rows)


def attention_decode(attn: Attention, x: Tensor, inp: DecodeInputs, k_cache: Tensor,
                     v_cache: Tensor) -> Tensor:
    """x [Bp, hidden] -> [Bp, hidden]; writes the new keys/values into the paged cache in place."""
    B, N, Nkv, D = x.shape[0], attn.N, attn.Nkv, attn.D
    q, k, v, gate = attn.project(x, inp.positions)  # [Bp, N, D], [Bp, Nkv, D] x2
    k_rows, v_rows = k_cache.view(-1, Nkv, D), v_cache.view(-1, Nkv, D)  # [NB·BS, Nkv, D]
    k_rows[inp.write_at] = k.to(k_rows.dtype)
    v_rows[inp.write_at] = v.to(v_rows.dtype)
    keys, values = k_rows[inp.read_at], v_rows[inp.read_at]  # [Bp, Lk, Nkv, D]
    seen = torch.arange(keys.shape[1], device=x.device)[None, :] < inp.kv_len[:, None]  # [Bp, Lk]
    if decode_attention_backend(x, attn.kernels) == "sdpa":  # fused kernels, in the model dtype
        o = F.scaled_dot_product_attention(
            q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=seen[:, None, None, :],
            scale=D ** -0.5, enable_gqa=Nkv != N)  # [Bp, N, 1, D]
        return attn.output(o.reshape(B, N * D).to(x.dtype), gate)
    qg = q.view(B, Nkv, N // Nkv, D).float()
    scores = torch.einsum("bgrd,bkgd->bgrk", qg, keys.float()) * D ** -0.5  # [Bp, Nkv, r, Lk]
    scores = scores.masked_fill(~seen[:, None, None, :], float("-inf"))
    o = torch.einsum("bgrk,bkgd->bgrd", scores.softmax(-1), values.float())  # [Bp, Nkv, r, D]
    return attn.output(o.reshape(B, N * D).to(x.dtype), gate)


def deltanet_decode(dn: GatedDeltaNet, x: Tensor, inp: DecodeInputs, conv: Tensor,
                    recurrent: Tensor) -> Tensor:
    """x [Bp, hidden] -> [Bp, hidden]; one conv and delta-rule step, states updated in place."""
    B, G, Hv, K, V = x.shape[0], dn.G, dn.H, dn.K, dn.V
    q, k, v, z, b, a = dn.split_projections(x)
    fresh = inp.fresh[:, None, None]
    window = torch.cat([torch.where(fresh, 0, conv[inp.slots]),
                        torch.cat([q, k, v], dim=-1)[:, :, None].to(conv.dtype)], dim=-1)  # [Bp, C, W]
    conv[inp.slots] = window[:, :, 1:]
    mixed = F.silu((window * dn.conv1d.weight[:, 0, :]).sum(-1))  # [Bp, C]
    q, k, v = torch.split(mixed, [G * K, G * K, Hv * V], dim=-1)
    r = Hv // G
    q = l2norm(q.reshape(B, G, K).float()).repeat_interleave(r, dim=1)  # [Bp, Hv, K]
    k = l2norm(k.reshape(B, G, K).float()).repeat_interleave(r, dim=1)
    g, beta = dn.decay_and_beta(a, b)  # [Bp, Hv]
    state = torch.where(fresh[..., None], 0, recurrent[inp.slots])  # [Bp, Hv, K, V]
    o, state = gated_delta_rule_step(q, k, v.reshape(B, Hv, V), g, beta, state)
    recurrent[inp.slots] = state
    o = dn.norm(o, z)  # [Bp, Hv, V]
    return dn.out_proj(o.reshape(B, Hv * V))


def moe_decode(moe: SparseMoeBlock, x: Tensor) -> tuple[Tensor, Tensor]:
    """x [Bp, hidden] -> (output [Bp, hidden], expert ids [Bp, k])."""
    ids, weights = moe.gate.forward(x)  # [Bp, k] x2; forward, not __call__: no hooks in a graph
    out = routed_experts_decode(moe.experts, x, ids, weights)
    shared = moe.shared(x)
    return (out if shared is None else out + shared), ids


def routed_experts_decode(ex: Experts, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
    """`Experts.forward` in static shapes: x [n, hidden], ids [n, k] global expert ids (-1: none),
    weights [n, k] -> Σ_k weight·expert(x) over the experts `ex` holds, [n, hidden]."""
    local = ex.local_index[ids]  # [n, k], -1 where the expert is held elsewhere
    w = weights * (local >= 0).to(weights.dtype)  # such pairs run on stacked expert 0, weighted 0
    j = local.clamp(min=0)
    if decode_moe_backend(x, ex) == "grouped_mm":
        return grouped_experts(ex, x, j, w)
    return _gathered_experts(ex, x, j, w)


def _gathered_experts(ex: Experts, x: Tensor, j: Tensor, w: Tensor) -> Tensor:
    """Each row gathers the weights of its own k experts (gpt-fast's MoE decode): static shapes,
    where the eager path's grouping by expert has data-dependent ones (and F.grouped_mm has no
    float32 CPU meta kernel to trace). For small experts inductor fuses gather and product into
    one loop; wide experts would copy Bp·k experts' weights per layer, so a real checkpoint wants
    a grouped GEMM (`grouped_experts`, chosen on CUDA by model/kernels.py). Measured on CPU, one
    step against eager: on the tiny experts computing every expert densely was no faster at batch
    16; on bench's wide
    checkpoint (hidden 1024, 64 experts of 256, top-8) gathering gave 0.79x / 0.92x at batch 1 / 8,
    the eager grouped GEMM called between two graphs 0.98x / 1.10x."""
    gate_up, down = ex.gathered(j)  # [Bp, k, 2I, hidden], [Bp, k, hidden, I]; FP8 experts dequantize
    gate, up = torch.einsum("bh,bkoh->bko", x, gate_up).chunk(2, dim=-1)  # [Bp, k, I] x2
    y = torch.einsum("bki,bkhi->bkh", F.silu(gate) * up, down)  # [Bp, k, hidden]
    return (y * w[..., None]).sum(1)


def grouped_experts(ex: Experts, x: Tensor, j: Tensor, w: Tensor) -> Tensor:
    """The same sum through one grouped GEMM per projection, in static shapes: all Bp·k pairs,
    sorted by stacked expert (a pair of an expert held elsewhere runs on expert 0 with weight 0),
    each expert's weights read once however many rows chose it. x [Bp, hidden], j, w [Bp, k]."""
    k, E = j.shape[1], ex.gate_up.shape[0]
    flat = j.flatten()  # [P]
    order = torch.argsort(flat, stable=True)
    counts = torch.zeros(E, dtype=torch.int32, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))  # [E], not bincount: its size is static
    offs = torch.cumsum(counts, 0, dtype=torch.int32)
    rows = order // k
    gate, up = F.grouped_mm(x[rows], ex.gate_up.transpose(-2, -1), offs=offs).chunk(2, dim=-1)  # [P, I] x2
    y = F.grouped_mm(F.silu(gate) * up, ex.down.transpose(-2, -1), offs=offs)  # [P, hidden]
    y = y * w.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, rows, y.to(x.dtype))


def mix_decode(layer: DecoderLayer, h: Tensor, inp: DecodeInputs, state: tuple[Tensor, Tensor]) -> Tensor:
    """The token-mixer half of a layer (`DecoderLayer.mix`) for a padded decode batch: h [Bp, hidden]."""
    x = layer.input_layernorm(h)
    if isinstance(layer.mixer, Attention):
        return h + attention_decode(layer.mixer, x, inp, *state)
    return h + deltanet_decode(layer.mixer, x, inp, *state)


def decode_layer(layer: DecoderLayer, h: Tensor, inp: DecodeInputs, state: tuple[Tensor, Tensor]
                 ) -> tuple[Tensor, Tensor | None]:
    """One decoder layer for a padded decode batch: h [Bp, hidden] -> (h, expert ids or None).
    `state`: the layer's (keys, values) or (conv, recurrent) tensors, updated in place."""
    h = mix_decode(layer, h, inp, state)
    y = layer.post_attention_layernorm(h)
    if isinstance(layer.mlp, SparseMoeBlock):
        out, ids = moe_decode(layer.mlp, y)
        return h + out, ids
    return h + layer.mlp(y), None


def decode_layers(layers: tuple[DecoderLayer, ...], h: Tensor, inp: DecodeInputs,
                  states: tuple[tuple[Tensor, Tensor], ...]) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """`decode_layer` over consecutive layers: h [Bp, hidden] -> (h, each layer's expert ids)."""
    ids = []
    for layer, state in zip(layers, states, strict=True):
        h, layer_ids = decode_layer(layer, h, inp, state)
        ids.append(layer_ids)
    return h, tuple(ids)


class MixerLayerOut(NamedTuple):
    """A layer's decode in a cluster mixer (`mixer_layer_decode`), rows [Bp] or cut to [B]."""

    h: Tensor                 # [Bp, hidden]: after the mixer; for a dense layer after its MLP too
    y: Tensor | None          # [Bp, hidden]: post-attention-normed h, what the routed experts take
    ids: Tensor | None        # [Bp, k] long: the gate's expert ids
    weights: Tensor | None    # [Bp, k]: their weights
    shared: Tensor | None     # [Bp, hidden]: the shared expert's output, if the model has one


def mixer_layer_decode(layer: DecoderLayer, h: Tensor, inp: DecodeInputs, state: tuple[Tensor, Tensor]
                       ) -> MixerLayerOut:
    """What a cluster mixer computes of one layer for a padded decode batch (cluster/workers.py
    MixerWorker.run): the mixer, then for a MoE layer the post-attention norm, gate and shared
    expert (the routed experts run in the expert shards), for a dense layer its MLP. The order of
    `DecoderLayer.mix` / `feed_forward` and the mixer's eager `run`."""
    h = mix_decode(layer, h, inp, state)
    y = layer.post_attention_layernorm(h)
    if not isinstance(layer.mlp, SparseMoeBlock):
        return MixerLayerOut(h + layer.mlp(y), None, None, None, None)
    ids, weights = layer.mlp.gate.forward(y)  # [Bp, k] x2; forward, not __call__: no hooks in a graph
    return MixerLayerOut(h, y, ids, weights, layer.mlp.shared(y))


MixerLayerFn = Callable[[DecoderLayer, Tensor, DecodeInputs, tuple[Tensor, Tensor]], MixerLayerOut]


def state_tensors(cache: Cache) -> tuple[Tensor, Tensor]:
    if isinstance(cache, KVCache):
        return cache.k, cache.v
    return cache.conv, cache.recurrent


LayersFn = Callable[[tuple[DecoderLayer, ...], Tensor, DecodeInputs, tuple[tuple[Tensor, Tensor], ...]],
                    tuple[Tensor, tuple[Tensor | None, ...]]]


def compile_layers_fn() -> LayersFn:
    """`decode_layers` under torch.compile. The layers are an argument: their parameters are graph
    inputs, so every group of layers of the same kinds shares one graph per bucket (regional
    compilation, as PyTorch's recipe for repeated blocks)."""
    return torch.compile(decode_layers, fullgraph=True)


# One bucket's step: h [Bp, hidden] and the padded inputs -> (h, each layer's expert ids [Bp, k] or None).
StepFn = Callable[[Tensor, DecodeInputs], tuple[Tensor, list[Tensor | None]]]


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
        self.layers_fn = layers_fn or compile_layers_fn()
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
        thread compiles, and after it failed."""
        return self.compiling or self.background_error is not None

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
        B = layout.num_seqs
        bucket = self.bucket(B)
        h = self.model.model.embed_tokens(F.pad(token_ids, (0, bucket - B)))  # [Bp, hidden]
        h, ids = self._step(bucket, h, self.inputs(layout, bucket))
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
        with self.compiles.first(bucket, f"decode step for batch bucket {bucket}"):
            if self.cuda_graphs:
                scratch = self.scratch_inputs(bucket, h.device)
                step = CudaGraphStep(self._run_layers, torch.zeros_like(h), scratch, self.graph_pool)
            else:
                step = self._run_layers
            out = step(h, inp)
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


class CompiledLayers(DecodePadding):
    """Decode steps of single layers, one compiled call each: for a cluster actor that holds a few
    layers (cluster/workers.py MixerWorker) and runs each in its own call, with the routed experts
    elsewhere. `layers`: layer index -> layer, `caches` alike (from `make_decode_cache`). A layer
    runs `mixer_layer_decode`; layers of the same kinds share its graph per bucket, as in
    `CompiledDecode`. `layer_fn`: the compiled function, default `mixer_layer_decode` under
    torch.compile. Keys keep a dynamic width (no CUDA graphs: a step spans several actors)."""

    def __init__(self, layers: Mapping[int, DecoderLayer], caches: Mapping[int, Cache], num_slots: int,
                 num_blocks: int, buckets: Sequence[int] | None = None,
                 layer_fn: MixerLayerFn | None = None) -> None:
        super().__init__(list(caches.values()), num_slots, num_blocks, buckets)
        self.layers = dict(layers)
        self.states = {i: state_tensors(c) for i, c in caches.items()}
        self.layer_fn = layer_fn or torch.compile(mixer_layer_decode, fullgraph=True)
        self.compiles = LazyCompiles()  # (bucket, mixer kind, MLP kind) -> seconds of its first run

    def step_inputs(self, layout: BatchLayout) -> tuple[int, DecodeInputs]:
        """The layout's bucket and padded inputs, made once per step for all its layers here."""
        key = ("compiled_layers", id(self))
        if key not in layout.derived:
            bucket = self.bucket(layout.num_seqs)
            layout.derived[key] = (bucket, self.inputs(layout, bucket))
        return layout.derived[key]

    def graph_key(self, index: int, bucket: int) -> tuple[int, str, str]:
        """Layers with the same key share a graph: (bucket, mixer kind, MLP kind)."""
        layer = self.layers[index]
        return bucket, type(layer.mixer).__name__, type(layer.mlp).__name__

    @torch.inference_mode()
    def warm_up(self, bucket: int) -> dict[tuple[int, str, str], float]:
        """Compile `bucket`'s graphs now, on scratch-only steps (they touch no sequence's state),
        rather than inside a step; returns the seconds each new graph took."""
        if bucket not in self.buckets:
            raise ValueError(f"{bucket} is not one of the batch buckets {self.buckets}")
        first: dict[tuple[int, str, str], int] = {}  # key -> its first layer here
        for index in self.layers:
            first.setdefault(self.graph_key(index, bucket), index)
        for key, index in first.items():
            if key not in self.compiles:
                p = self.layers[index].post_attention_layernorm.weight  # [hidden], the model dtype
                h = torch.zeros(bucket, p.shape[0], dtype=p.dtype, device=p.device)
                self._run(index, h, self.scratch_inputs(bucket, p.device))
        return {k: self.compiles.seconds[k] for k in first}

    @torch.inference_mode()
    def __call__(self, index: int, h: Tensor, layout: BatchLayout) -> MixerLayerOut:
        """Layer `index` on h [B, hidden] of a decode layout (`supports`): `mixer_layer_decode`'s
        outputs cut back to the B real rows."""
        if not self.supports(layout):
            raise ValueError(f"not a decode step of at most {self.buckets[-1]} sequences")
        B = layout.num_seqs
        bucket, inp = self.step_inputs(layout)
        out = self._run(index, F.pad(h, (0, 0, 0, bucket - B)), inp)  # padded to [Bp, hidden]
        return MixerLayerOut(*(None if t is None else t[:B] for t in out))

    def _run(self, index: int, h: Tensor, inp: DecodeInputs) -> MixerLayerOut:
        layer = self.layers[index]
        torch._dynamo.mark_static(h, 0)  # one graph per bucket, never a dynamic batch
        if isinstance(layer.mixer, Attention):
            torch._dynamo.mark_dynamic(inp.read_at, 1)  # any context length, one graph
        key = self.graph_key(index, h.shape[0])
        if key in self.compiles:
            with self.compiles.trusted():
                return self.layer_fn(layer, h, inp, self.states[index])
        with self.compiles.first(key, f"decode layer ({key[1]}, {key[2]}) for batch bucket {key[0]}"):
            return self.layer_fn(layer, h, inp, self.states[index])


RoutedFn = Callable[[Experts, Tensor, Tensor, Tensor], Tensor]


class CompiledExperts:
    """A cluster expert shard's routed experts (cluster/workers.py ExpertWorker) for batches of at
    most `max_rows` rows, through `routed_experts_decode` under torch.compile. The rows a shard
    gets per layer vary with the routing, so the row count is a dynamic dimension (one graph for
    all counts; a single row is padded to two, with weight 0, as torch specializes sizes 0 and 1).
    `routed_fn`: the compiled function, default `routed_experts_decode` under torch.compile."""

    def __init__(self, max_rows: int, routed_fn: RoutedFn | None = None) -> None:
        if max_rows < 1:
            raise ValueError(f"max_rows must be >= 1, got {max_rows}")
        self.max_rows = max_rows
        self.routed_fn = routed_fn or torch.compile(routed_experts_decode, fullgraph=True)
        self.compiles = LazyCompiles()  # "experts" -> seconds of the first run

    def supports(self, ex: Experts, num_rows: int) -> bool:
        return 1 <= num_rows <= self.max_rows and len(ex.expert_ids) > 0

    @property
    def warmed(self) -> bool:
        """The graph is made (`warm_up`, or a first call)."""
        return "experts" in self.compiles

    @torch.inference_mode()
    def warm_up(self, ex: Experts, k: int) -> dict[str, float]:
        """Compile now, on two rows of `k` pairs routed to no expert (weight 0): nothing but the
        graph is made."""
        if "experts" not in self.compiles and self.supports(ex, 2):
            x = torch.zeros(2, ex.down.shape[1], dtype=ex.down.dtype, device=ex.down.device)
            ids = torch.full((2, k), -1, dtype=torch.long, device=x.device)
            self(ex, x, ids, torch.zeros(2, k, dtype=x.dtype, device=x.device))
        return dict(self.compiles.seconds)  # type: ignore[arg-type]

    @torch.inference_mode()
    def __call__(self, ex: Experts, x: Tensor, ids: Tensor, weights: Tensor) -> Tensor:
        n = x.shape[0]
        if not self.supports(ex, n):
            raise ValueError(f"{n} rows for {len(ex.expert_ids)} experts: the compiled experts take 1 to "
                             f"{self.max_rows} rows for at least one")
        # New tensors even without padding, made here in inference mode whatever the caller's
        # were, so every call passes the same guards.
        pad = (0, 0, 0, 1 if n == 1 else 0)
        x, ids, weights = F.pad(x, pad), F.pad(ids, pad, value=-1), F.pad(weights, pad)
        for t in (x, ids, weights):
            torch._dynamo.mark_dynamic(t, 0)
        if "experts" in self.compiles:
            with self.compiles.trusted():
                return self.routed_fn(ex, x, ids, weights)[:n]
        with self.compiles.first("experts", f"routed experts for up to {self.max_rows} rows"):
            return self.routed_fn(ex, x, ids, weights)[:n]
