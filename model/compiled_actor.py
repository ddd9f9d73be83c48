"""Compiled decode for the cluster's actors (cluster/workers.py): `CompiledLayers` runs one layer per
call for a mixer that holds a few (its mixer half, gate and shared expert), `CompiledExperts` an
expert shard's routed experts; both over the decode math of model/decode_math.py, padded to
buckets by model/compiled.py's `DecodePadding` and compiled lazily through its `LazyCompiles`."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from model.attention import Attention
from model.batch import BatchLayout
from model.compiled import DecodePadding, LazyCompiles
from model.decode_math import (
    DecodeInputs,
    MixerLayerFn,
    MixerLayerOut,
    mixer_layer_decode,
    routed_experts_decode,
    state_tensors,
)
from model.decoder import Cache, DecoderLayer
from model.moe import Experts


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
        if bucket == B:  # a full bucket: neither padded nor cut (a pad and 5 slices a layer otherwise)
            return self._run(index, h if h.is_inference() else h.clone(), inp)
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
        # Inference tensors, contiguous, whatever the caller's were (new ones only where needed: a
        # pad costs a dispatch), so every call passes the same guards.
        if n == 1:
            pad = (0, 0, 0, 1)
            x, ids, weights = F.pad(x, pad), F.pad(ids, pad, value=-1), F.pad(weights, pad)
        else:
            x, ids, weights = (t if t.is_inference() and t.is_contiguous() else t.contiguous().clone()
                               for t in (x, ids, weights))
        for t in (x, ids, weights):
            torch._dynamo.mark_dynamic(t, 0)
        if "experts" in self.compiles:
            with self.compiles.trusted():
                out = self.routed_fn(ex, x, ids, weights)
        else:
            with self.compiles.first("experts", f"routed experts for up to {self.max_rows} rows"):
                out = self.routed_fn(ex, x, ids, weights)
        return out[:n] if n == 1 else out
