"""The cluster's actor classes (plain classes; cluster/executor.py makes them Ray actors):
a mixer holds some attention or DeltaNet layers with their per-slot cache, the gate and shared
expert of those layers, and the embedding / final norm + LM head when it runs the first / last
layer; an expert shard holds a slice of the routed experts of every MoE layer. Each reads from
the checkpoint only the tensors it holds.

Legend: T tokens of a (micro-)batch, H hidden, S expert shards, R logits rows, V vocab."""

from __future__ import annotations

import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from cluster.messages import (
    Carry,
    ShardResult,
    ShardWork,
    StepMsg,
    StepResult,
    Telemetry,
    Wired,
    counts_by_layer,
    from_wire,
    to_wire,
)
from cluster.placement import MixerSpec
from engine.cpu_runtime import flushes_denormals, keep_freed_memory
from model.batch import BatchLayout
from model.cache import DeltaNetState, StateSnapshots
from model.compiled_actor import CompiledExperts, CompiledLayers
from model.config import ModelConfig
from model.decode_math import make_decode_cache
from model.decoder import DecoderLayer
from model.loading import load_experts, load_module, materialize
from model.moe import Experts
from model.norm import RMSNorm
from model.weights import CheckpointReader
from router.dispatch import Router, combine
from router.placement import ExpertPlacement


def _init_process() -> None:
    torch.set_num_threads(1)  # several actors share a node's cores; one thread each is fastest
    # Inputs under compiled graphs are read-only views of channel buffers; we only read them.
    warnings.filterwarnings("ignore", message="The given NumPy array is not writable")


def _built(module: nn.Module, reader: CheckpointReader, prefix: str, device: str,
           dtype: torch.dtype) -> nn.Module:
    """`module` was built on the meta device: allocate it and read its tensors under `prefix`."""
    materialize(module, device, dtype)
    load_module(module, reader, prefix)
    return module.eval()


class MixerWorker:
    def __init__(self, model_dir: str, dtype: str | None, spec: MixerSpec, num_slots: int,
                 max_model_len: int, experts: ExpertPlacement | None, device: str = "cpu",
                 block_size: int = 16, num_kv_blocks: int | None = None,
                 tensor_transport: str = "host", num_state_snapshots: int = 0,
                 compile: bool = False) -> None:
        """`compile`: decode steps run each layer here compiled, per batch bucket (model/compiled_actor.py
        CompiledLayers); other steps, and decode steps past the largest bucket, eagerly."""
        _init_process()
        self.host_wire = tensor_transport == "host"  # cluster/messages.py: numpy, else torch tensors
        c = self.config = ModelConfig.from_dir(model_dir, dtype=dtype)
        self.spec, self.device, self.dtype = spec, torch.device(device), c.torch_dtype
        self.on_host = self.device.type == "cpu"  # wire arrays are used in place, no .to() per tensor
        if self.on_host:  # as the local executor: engine/cpu_runtime.py (page faults, denormals)
            keep_freed_memory()
        reader = CheckpointReader(model_dir)
        with torch.device("meta"):
            # expert_ids=[]: the routed experts live in the shards; gate and shared expert stay here
            layers = {i: DecoderLayer(c, i, expert_ids=[]) for i in spec.layers}
            embed = nn.Embedding(c.vocab_size, c.hidden_size) if spec.embeds else None
            norm = RMSNorm(c.hidden_size, c.rms_norm_eps, c.zero_centered_norm) if spec.has_head else None
            lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False) if spec.has_head else None
        self.layers = {i: _built(m, reader, f"model.layers.{i}.", device, self.dtype)
                       for i, m in layers.items()}
        self.embed = embed and _built(embed, reader, "model.embed_tokens.", device, self.dtype)
        self.norm = norm and _built(norm, reader, "model.norm.", device, self.dtype)
        if lm_head is not None and c.tie_word_embeddings and self.embed is not None:
            lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False, device=device, dtype=self.dtype)
            lm_head.weight = self.embed.weight
            self.lm_head = lm_head
        elif lm_head is not None:
            head_prefix = "model.embed_tokens." if c.tie_word_embeddings else "lm_head."
            self.lm_head = _built(lm_head, reader, head_prefix, device, self.dtype)
        else:
            self.lm_head = None
        # Attention layers: the paged KV cache the engine's block tables index (num_kv_blocks None:
        # every slot at max_model_len); DeltaNet layers: per-slot state.
        # With `compile`, the caches get the scratch slot and block that padded rows use.
        if compile:
            self.caches = {i: make_decode_cache(m, num_slots, max_model_len, self.dtype, device, block_size,
                                                num_kv_blocks) for i, m in self.layers.items()}
            blocks = num_slots * -(-max_model_len // block_size) if num_kv_blocks is None else num_kv_blocks
            self.decode: CompiledLayers | None = CompiledLayers(self.layers, self.caches, num_slots, blocks)
        else:
            self.caches = {i: m.make_cache(num_slots, max_model_len, self.dtype, device, block_size,
                                           num_kv_blocks) for i, m in self.layers.items()}
            self.decode = None
        # Saved DeltaNet states for prefix caching, per DeltaNet layer here: each step's saves and
        # loads run on a layer just before its tokens do (`run`).
        self.snapshots = {i: StateSnapshots(c, num_state_snapshots) for i, c in self.caches.items()
                          if isinstance(c, DeltaNetState) and num_state_snapshots > 0}
        self.router = Router(experts, c.num_experts_per_tok) if experts is not None else None
        self.moe_row = {layer: i for i, layer in enumerate(c.moe_layers)}  # layer -> its row in `counts`
        self.accessed = list(reader.accessed)
        reader.close()
        self._batches: dict[int, tuple[BatchLayout, Tensor]] = {}
        self._pending: dict[int, _Unsent] = {}  # seq -> what its Carry does not hold yet (`_carry`)
        self.shard_names = [f"experts-{s}" for s in range(experts.num_shards if experts else 0)]

    def accessed_tensors(self) -> list[str]:
        return self.accessed

    def ready(self) -> str:
        return self.spec.name

    def warm_up(self, bucket: int) -> dict[str, float]:
        """Compile decode batch bucket `bucket`'s graphs of the layers here (engine.compile), before
        a step needs them: a compile takes far longer than a step may. Returns each new graph's
        seconds, by "<bucket>/<mixer>/<MLP>"."""
        if self.decode is None:
            raise RuntimeError(f"{self.spec.name} was started without compile")
        return {"/".join(map(str, k)): s for k, s in self.decode.warm_up(bucket).items()}

    def set_expert_placement(self, experts: ExpertPlacement) -> str:
        """Route to a new set of shards from the next step on (expert rebalancing); the caches stay."""
        self.router = Router(experts, self.config.num_experts_per_tok)
        self.shard_names = [f"experts-{s}" for s in range(experts.num_shards)]
        return self.spec.name

    @flushes_denormals  # on CPU, as the local executor's steps (engine/cpu_runtime.py)
    def run(self, layer: int, msg: StepMsg, carry: Carry | None, *partials: ShardResult | None):
        """Finish layer-1's MLP (combine), then layer `layer`'s mixer; for a MoE layer also gate,
        shared expert and dispatch: returns (Carry, one ShardWork per shard), else a Carry."""
        moe = layer in self.moe_row
        if msg.step is None:  # an empty micro-batch lane: pass nothing along
            return (None,) * (1 + self.router.placement.num_shards) if moe else None
        start = time.perf_counter()
        h, pending = self._resume(msg, carry, partials)
        m = self.layers[layer]
        with torch.inference_mode():
            layout, _ = self._batch(msg)
            step = msg.step
            cache = self.caches[layer]
            # Speculative decoding: the previous verify step's rollbacks (lane 0, before the saves),
            # which also forget its kept states.
            if msg.lane == 0 and isinstance(cache, DeltaNetState) and (cache.kept or step.state_rollbacks):
                cache.rollback(step.state_rollbacks)
            if layer in self.snapshots and (step.state_saves or step.state_loads):
                self.snapshots[layer].apply(step.state_saves, step.state_loads)
            if self.decode is not None and self.decode.supports(layout):  # compiled, the same math
                h, y, ids, weights, shared = self.decode(layer, h, layout)  # [T, H], None for a dense layer
                if not moe:
                    return self._carry(layer, msg, carry, pending, start, h, None, ())
            else:
                h = m.mix(h, layout, self.caches[layer])  # [T, H]
                if not moe:
                    return self._carry(layer, msg, carry, pending, start, m.feed_forward(h), None, ())
                y = m.post_attention_layernorm(h)
                ids, weights = m.mlp.gate(y)  # [T, k] each
                shared = m.mlp.shared(y)
            plan = self.router.plan(ids, weights)
            pending.count(self.moe_row[layer], to_wire(ids), len(self.moe_row), self.config.num_experts)
            if plan.rows[0] is None:  # all rows to every shard, one message for all
                one = ShardWork(layer, self._wire(y), self._wire(ids), self._wire(weights))
                work = [one] * len(plan.rows)
                rows: tuple[Wired | None, ...] = plan.rows
            else:
                work = [ShardWork(layer, self._wire(y[r]), self._wire(i), self._wire(w))
                        for r, i, w in zip(plan.rows, plan.ids, plan.weights, strict=True)]
                rows = tuple(self._wire(r) for r in plan.rows)
            pending.dispatch_bytes += sum(w.nbytes for w in work)
            carry_out = self._carry(layer, msg, carry, pending, start, h, shared, rows)
        return (carry_out, *work)

    @flushes_denormals  # on CPU, as the local executor's steps (engine/cpu_runtime.py)
    def finish(self, msg: StepMsg, carry: Carry | None, *partials: ShardResult | None) -> StepResult | None:
        """Combine the last layer's MLP, final norm, LM head at the step's logits rows: [R, V]
        float32, with the step's pairs per expert and what the step cost."""
        if msg.step is None:
            return None
        start = time.perf_counter()
        h, pending = self._resume(msg, carry, partials)
        with torch.inference_mode():
            index = torch.tensor(msg.step.logits_index, dtype=torch.long, device=self.device)
            normed = self.norm(h)
            logits = to_wire(self.lm_head(normed[index]).float())
            hidden = to_wire(normed) if msg.want_hidden else None
        del self._pending[msg.seq]
        counts = counts_by_layer(self._counts(carry, pending), self.config.moe_layers)
        return StepResult(logits, counts, self._telemetry(carry, pending, start), hidden)

    def _batch(self, msg: StepMsg) -> tuple[BatchLayout, Tensor]:
        """Layout and token ids of a (micro-)batch, built on its first layer here; the lanes' calls
        alternate, so those of this step's lanes (numbered seq - lane on) are kept."""
        if msg.seq not in self._batches:
            s = msg.step
            layout = BatchLayout.build(list(s.slots), list(s.starts), list(s.lengths), self.device,
                                       s.block_tables, keep_states=s.keep_states)
            tokens = torch.tensor(s.token_ids, dtype=torch.long, device=self.device)
            self._batches = {k: v for k, v in self._batches.items() if k >= msg.seq - msg.lane}
            self._batches[msg.seq] = (layout, tokens)
        return self._batches[msg.seq]

    def _wire(self, t: Tensor) -> Wired:
        return to_wire(t, self.host_wire)

    def _tensor(self, a: Wired, dtype: torch.dtype) -> Tensor:
        t = from_wire(a, dtype)
        return t if self.on_host else t.to(self.device)

    def _resume(self, msg: StepMsg, carry: Carry | None, partials: Sequence[ShardResult],
                ) -> tuple[Tensor, _Unsent]:
        """The residual stream entering the next layer: embeddings, or the previous layer's carry
        plus its MLP output (shared expert + the shards' combined partial sums); and what this
        mixer has counted of the (micro-)batch since its Carry last came from another actor, with
        this call's telemetry so far (the shards' seconds and the bytes of their answers)."""
        if msg.seq in self._pending:  # the carry is this mixer's own, from its previous layer
            pending = self._pending[msg.seq]
            pending.shard_seconds = [0.0] * len(self.shard_names)
            pending.dispatch_bytes = pending.combine_bytes = 0
        else:  # a new (micro-)batch, or a Carry from another actor: the entries of older ones go
            self._pending = {k: v for k, v in self._pending.items() if k >= msg.seq - msg.lane}
            pending = self._pending[msg.seq] = _Unsent([0.0] * len(self.shard_names))
        with torch.inference_mode():
            if carry is None:
                return self.embed(self._batch(msg)[1]), pending
            h = self._tensor(carry.h, self.dtype)
            if not carry.rows:
                return h, pending
            parts = []
            for s, p in enumerate(partials):
                pending.shard_seconds[s] += p.seconds
                pending.combine_bytes += p.partial.nbytes
                parts.append(self._tensor(p.partial, self.dtype))
            rows = [None if r is None else self._tensor(r, torch.long) for r in carry.rows]
            mlp = combine(parts, rows, h.shape[0])
            if carry.shared is not None:
                mlp = mlp + self._tensor(carry.shared, self.dtype)
            return h + mlp, pending  # the order of model.decoder: h + (routed + shared)

    def _carry(self, layer: int, msg: StepMsg, carry: Carry | None, pending: _Unsent, start: float,
               h: Tensor, shared: Tensor | None, rows: tuple[Wired | None, ...]) -> Carry:
        """The Carry after `layer`, its telemetry up to this call. One that stays here (the next
        layer is this mixer's too) keeps the counts it came with, this mixer's waiting in
        `pending`; one that leaves takes them (`_counts`): a copy of the [M, E] counts per layer
        cost more than a layer's own eager work (bench/layer_costs.py), one per visit does not."""
        h_out, shared_out = self._wire(h), None if shared is None else self._wire(shared)
        telemetry = self._telemetry(carry, pending, start)
        if layer + 1 in self.layers:
            return Carry(h_out, shared_out, rows, None if carry is None else carry.counts, telemetry)
        del self._pending[msg.seq]
        return Carry(h_out, shared_out, rows, self._counts(carry, pending), telemetry)

    @staticmethod
    def _counts(carry: Carry | None, pending: _Unsent) -> np.ndarray | None:
        """The carry's counts with this visit's rows added ([M, E] int32, a new array: a received one
        may be a read-only view); the rows run here are zeros in the carry's, the others in ours."""
        counts = None if carry is None else carry.counts
        if pending.counts is None:
            return counts
        return pending.counts if counts is None else counts + pending.counts

    def _telemetry(self, carry: Carry | None, pending: _Unsent, start: float) -> Telemetry:
        """The carry's telemetry with this call's added: its seconds (since `start`), the shards'
        seconds and the router's bytes; one dict made, not one per `Telemetry.add`."""
        before = Telemetry() if carry is None else carry.telemetry
        seconds = dict(before.seconds)
        for name, s in zip(self.shard_names, pending.shard_seconds, strict=True):
            if s:
                seconds[name] = seconds.get(name, 0.0) + s
        me = self.spec.name
        seconds[me] = seconds.get(me, 0.0) + time.perf_counter() - start
        return Telemetry(seconds, before.dispatch_bytes + pending.dispatch_bytes,
                         before.combine_bytes + pending.combine_bytes)


@dataclass
class _Unsent:
    """What a mixer has counted of a (micro-)batch since its Carry came from another actor, not yet
    in a Carry: the gate's pairs per expert of the MoE layers it ran ([M, E] int32, zeros elsewhere;
    None before the first); and the current call's shard seconds and bytes moved."""

    shard_seconds: list[float]
    dispatch_bytes: int = 0
    combine_bytes: int = 0
    counts: np.ndarray | None = None

    def count(self, row: int, ids: np.ndarray, num_moe_layers: int, num_experts: int) -> None:
        """Row `row` of `counts`: the pairs per expert of the gate's ids [T, k] (-1: a dropped pair)."""
        if self.counts is None:
            self.counts = np.zeros((num_moe_layers, num_experts), np.int32)
        flat = ids.ravel()
        try:
            self.counts[row] = np.bincount(flat, minlength=num_experts)
        except ValueError:  # a dropped pair (-1): the gate makes none, other routers may
            self.counts[row] = np.bincount(flat[flat >= 0], minlength=num_experts)


class ExpertWorker:
    def __init__(self, model_dir: str, dtype: str | None, shard: int, expert_ids: Sequence[int],
                 device: str = "cpu", tensor_transport: str = "host", compile_rows: int = 0) -> None:
        """`compile_rows` > 0 (engine.compile): calls of at most that many rows (a decode step's,
        at most one per slot) run compiled (model/compiled_actor.py CompiledExperts), larger ones eagerly."""
        _init_process()
        self.decode = CompiledExperts(compile_rows) if compile_rows > 0 else None
        self.host_wire = tensor_transport == "host"
        self.model_dir, self.config = model_dir, ModelConfig.from_dir(model_dir, dtype=dtype)
        self.shard, self.device, self.dtype = shard, torch.device(device), self.config.torch_dtype
        if self.device.type == "cpu":  # as the local executor: engine/cpu_runtime.py
            keep_freed_memory()
        self.experts: dict[int, Experts] = {}
        self.set_experts(expert_ids)

    def set_experts(self, expert_ids: Sequence[int]) -> list[int]:
        """Hold `expert_ids` from now on (expert rebalancing): the old slice is dropped before the
        new one is read, so a GPU never holds both. A shard keeps nothing but weights, so this is
        all a new placement asks of it."""
        c = self.config
        self.experts = {}
        reader = CheckpointReader(self.model_dir)
        experts = {}
        for layer in c.moe_layers:
            with torch.device("meta"):
                ex = Experts(c.hidden_size, c.moe_intermediate_size, expert_ids, c.num_experts)
            materialize(ex, self.device, self.dtype)
            load_experts(ex, reader, f"model.layers.{layer}.mlp.experts.")
            experts[layer] = ex.eval()
        self.experts = experts
        if self.decode is not None:  # other shapes: compiled again (the executor warms it up again)
            self.decode = CompiledExperts(self.decode.max_rows)
        self.accessed = list(reader.accessed)
        reader.close()
        return sorted(expert_ids)

    def accessed_tensors(self) -> list[str]:
        return self.accessed

    def ready(self) -> str:
        return f"experts-{self.shard}"

    def warm_up(self) -> dict[str, float]:
        """Compile the routed experts' graph (engine.compile) before a step needs it; its seconds."""
        if self.decode is None:
            raise RuntimeError(f"experts-{self.shard} was started without compile")
        return self.decode.warm_up(next(iter(self.experts.values())), self.config.num_experts_per_tok)

    @flushes_denormals  # on CPU, as the local executor's steps (engine/cpu_runtime.py)
    def run(self, work: ShardWork | None) -> ShardResult | None:
        """Σ_k weight_k · expert_k(x) over this shard's pairs of its rows: [n, H]."""
        if work is None:
            return None
        start = time.perf_counter()
        with torch.inference_mode():
            x = from_wire(work.x, self.dtype).to(self.device)
            ids = from_wire(work.ids, torch.long).to(self.device)
            weights = from_wire(work.weights, self.dtype).to(self.device)
            ex = self.experts[work.layer]
            # The same sum, compiled, once the graph is made: the executor warms it up with the
            # first decode bucket, and a prefill's few rows before then must not wait for a compile.
            if self.decode is not None and self.decode.warmed and self.decode.supports(ex, x.shape[0]):
                out = self.decode(ex, x, ids, weights)
            else:
                out = ex(x, ids, weights)
            partial = to_wire(out, self.host_wire)
        return ShardResult(partial, time.perf_counter() - start)
