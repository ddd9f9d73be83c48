"""The executor interface: run one engine step (a packed batch of prefill chunks and decode
tokens over cache slots) and return logits. `local` runs the whole model in this process;
`cluster` (cluster/) runs it as Ray actors. Both must give the same logits."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from engine.block_manager import blocks_for
from model.config import ModelConfig

# Caches are allocated up front for num_slots × max_model_len tokens unless num_kv_blocks says
# otherwise; a checkpoint's native context (262k for Qwen3-Next) would not fit, so without an
# explicit length the slot length is capped here.
DEFAULT_MAX_MODEL_LEN = 4096
# Saved DeltaNet states an executor keeps for prefix caching unless told otherwise
# (engine.prefix_cache_states); each holds one slot's state of every DeltaNet layer.
DEFAULT_PREFIX_CACHE_STATES = 32


class ExecutorStateLostError(RuntimeError):
    """A step failed because part of the executor died (an actor, a node): the step's logits and
    every sequence's cached state are gone. `recovered`: the executor rebuilt itself and takes
    steps again, so the engine can recompute its sequences from their tokens; otherwise the
    requests must end with an error."""

    def __init__(self, message: str, recovered: bool) -> None:
        super().__init__(message)
        self.recovered = recovered


@dataclass(frozen=True)
class StepInput:
    """One step. Sequence b owns `slots[b]`, already has `starts[b]` tokens cached and brings
    `lengths[b]` new tokens, packed in order in `token_ids`. `logits_index` lists the packed
    positions whose next-token logits the caller wants (usually each sequence's last token).
    `block_tables[b]`: the KV-cache blocks holding sequence b's tokens in order, at least
    ceil((starts[b] + lengths[b]) / block_size) of them; None: each slot owns a fixed run of
    blocks, which needs the executor's default num_kv_blocks.
    Prefix caching (engine/prefix_cache.py): before the step's tokens run, `state_saves` copies the
    DeltaNet state of slot s into snapshot entry j for each (s, j), then `state_loads` copies entry
    j into slot s for each (j, s); a sequence resumed from a snapshot starts past 0.
    Speculative decoding: `num_drafts[b]` of sequence b's new tokens, at the end of its chunk, are
    draft tokens to verify (empty: none); the executor then keeps the DeltaNet state after each of
    them until it rolls back to the accepted ones: `state_rollbacks` (slot, n) sets slot's DeltaNet
    state to the one after the first n tokens of its chunk in the previous step (an executor that
    defers the rollback to the next step, as the cluster executor does, carries them here; applied
    before `state_saves`)."""

    token_ids: tuple[int, ...]
    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    logits_index: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...] | None = None
    state_saves: tuple[tuple[int, int], ...] = ()  # (slot, snapshot entry)
    state_loads: tuple[tuple[int, int], ...] = ()  # (snapshot entry, slot)
    num_drafts: tuple[int, ...] = ()
    state_rollbacks: tuple[tuple[int, int], ...] = ()  # (slot, tokens kept)

    def __post_init__(self) -> None:
        if not (len(self.slots) == len(self.starts) == len(self.lengths)):
            raise ValueError("slots, starts and lengths must have one entry per sequence")
        if sum(self.lengths) != len(self.token_ids):
            raise ValueError(f"lengths sum to {sum(self.lengths)} but {len(self.token_ids)} tokens given")
        if any(not 0 <= i < len(self.token_ids) for i in self.logits_index):
            raise ValueError("logits_index points outside the step's tokens")
        if self.block_tables is not None:
            if len(self.block_tables) != len(self.slots):
                raise ValueError(f"{len(self.block_tables)} block tables for {len(self.slots)} sequences")
            if any(not t or min(t) < 0 for t in self.block_tables):
                raise ValueError("every block table needs at least one block id, all >= 0")
        if len({j for _, j in self.state_saves}) < len(self.state_saves):
            raise ValueError(f"state_saves {self.state_saves} name a snapshot entry twice")
        if len({s for _, s in self.state_loads}) < len(self.state_loads):
            raise ValueError(f"state_loads {self.state_loads} name a slot twice")
        if self.num_drafts and (len(self.num_drafts) != len(self.slots) or any(
                not 0 <= d < n for d, n in zip(self.num_drafts, self.lengths, strict=True))):
            raise ValueError(f"num_drafts {self.num_drafts} needs one count per sequence, each below its "
                             f"length {self.lengths}")

    @property
    def keep_states(self) -> int:
        """New tokens per sequence whose DeltaNet states a verify step keeps (0: not one)."""
        return max(self.num_drafts) + 1 if any(self.num_drafts) else 0


@dataclass(frozen=True)
class StepTelemetry:
    """One step of a distributed executor: per actor, its kind (attention, deltanet, experts) and
    the seconds its calls took; and the bytes the token router moved to the expert shards
    (dispatch) and back (combine)."""

    actor_seconds: tuple[tuple[str, float], ...]
    dispatch_bytes: int
    combine_bytes: int


class Executor(ABC):
    """Runs steps over `num_slots` sequence slots of at most `max_model_len` tokens each. Each
    attention layer's KV cache has `num_kv_blocks` blocks of `block_size` tokens, which the
    engine hands out to sequences (engine/block_manager.py); None: the executor keeps no paged
    KV cache, and steps carry no block tables."""

    config: ModelConfig
    num_slots: int
    max_model_len: int
    block_size: int = 16
    num_kv_blocks: int | None = None
    # Seconds without work after which the engine calls `idle()`; None: never.
    idle_after_s: float | None = None
    # Whether the executor takes steps that start past 0 on a fresh slot (shared KV blocks, a
    # loaded state) and carries state_saves / state_loads: the engine caches prefixes only then.
    supports_prefix_caching: bool = False
    num_state_snapshots: int = 0  # DeltaNet snapshot entries (0 for a model without DeltaNet)
    # Speculative decoding: most draft tokens `propose` makes per sequence (engine.speculative_tokens;
    # 0: the executor has no drafter).
    speculative_tokens: int = 0

    def __init__(self, config: ModelConfig, num_slots: int, max_model_len: int | None, block_size: int,
                 num_kv_blocks: int | None, num_state_snapshots: int = 0) -> None:
        """The cache sizes every executor shares, checked before anything is allocated.
        `max_model_len` None: min(the model's context, DEFAULT_MAX_MODEL_LEN); `num_kv_blocks`
        None: every slot can hold max_model_len tokens, so the engine never preempts.
        `num_state_snapshots`: saved DeltaNet states for prefix caching (none kept for a model
        without DeltaNet layers)."""
        for name, value in (("num_slots", num_slots), ("max_model_len", max_model_len),
                            ("block_size", block_size), ("num_kv_blocks", num_kv_blocks)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if num_state_snapshots < 0:
            raise ValueError(f"num_state_snapshots must be >= 0, got {num_state_snapshots}")
        self.config = config
        self.num_slots = num_slots
        self.max_model_len = max_model_len or min(config.max_position_embeddings, DEFAULT_MAX_MODEL_LEN)
        self.block_size = block_size
        self.num_kv_blocks = num_kv_blocks or num_slots * blocks_for(self.max_model_len, block_size)
        self.num_state_snapshots = num_state_snapshots if config.deltanet_layers else 0

    def check_step(self, step: StepInput) -> None:
        """Refuse a step that names a slot or a position this executor does not have."""
        if any(not 0 <= s < self.num_slots for s in step.slots):
            raise ValueError(f"slots {step.slots} outside 0..{self.num_slots - 1}")
        if any(s + n > self.max_model_len for s, n in zip(step.starts, step.lengths, strict=True)):
            raise ValueError(f"a sequence of the step runs past max_model_len={self.max_model_len}")
        entries = [j for _, j in step.state_saves] + [j for j, _ in step.state_loads]
        if any(not 0 <= j < self.num_state_snapshots for j in entries):
            raise ValueError(f"snapshot entries {entries} outside 0..{self.num_state_snapshots - 1}")
        slots = [s for s, _ in step.state_saves] + [s for _, s in step.state_loads]
        if any(not 0 <= s < self.num_slots for s in slots):
            raise ValueError(f"snapshot slots {slots} outside 0..{self.num_slots - 1}")

    @abstractmethod
    def execute(self, step: StepInput) -> Tensor:
        """Float32 logits [len(step.logits_index), vocab_size]."""

    def propose(self, accepted: Sequence[int], next_token_ids: Sequence[int], num_drafts: Sequence[int],
                ) -> list[list[int]]:
        """Speculative decoding, after each `execute` (prefill chunks included: the drafter caches
        them too): sequence b of that step keeps its first `accepted[b]` new tokens (0: it ended;
        fewer than its length: rejected drafts, whose DeltaNet states are rolled back), the token
        after them is `next_token_ids[b]`, and it gets `num_drafts[b]` draft tokens to verify
        next (<= speculative_tokens). Returns them, one list per sequence of the step."""
        raise NotImplementedError(f"{type(self).__name__} has no drafter (engine.speculative_tokens)")

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Free what the executor started (actors, placement groups)."""

    def healthy(self) -> bool:
        """Whether the executor can take a step now (a server's health check reads it)."""
        return True

    def take_expert_counts(self) -> dict[int, list[int]]:
        """(token, expert) pairs the gate of each MoE layer routed per expert since the last call
        ({layer: [num_experts]}); {} where the executor does not see the gate (a metrics input)."""
        return {}

    def compiled_buckets(self) -> tuple[tuple[int, ...], bool]:
        """engine.compile: (the decode batch buckets compiled so far, whether more are compiling
        in the background); ((), False) for an executor that runs every step eagerly."""
        return (), False

    def compile_error(self) -> str:
        """engine.compile: why compiling failed, if it did ("" otherwise): the decode steps it
        would have compiled run eagerly."""
        return ""

    def idle(self) -> None:  # noqa: B027 - optional hook
        """The engine has had no work for `idle_after_s`: release what costs while waiting (the
        next `execute` takes it back)."""

    def take_step_telemetry(self) -> list[StepTelemetry]:
        """What each step since the last call cost inside the executor, oldest first: [] for an
        executor of one process (a metrics input)."""
        return []
