"""The executor interface: run one engine step (a packed batch of prefill chunks and decode
tokens over cache slots) and return logits. `local` runs the whole model in this process;
`cluster` (cluster/) runs it as Ray actors. Both must give the same logits."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from model.config import ModelConfig


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
    blocks, which needs the executor's default num_kv_blocks."""

    token_ids: tuple[int, ...]
    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    logits_index: tuple[int, ...]
    block_tables: tuple[tuple[int, ...], ...] | None = None

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

    @abstractmethod
    def execute(self, step: StepInput) -> Tensor:
        """Float32 logits [len(step.logits_index), vocab_size]."""

    def release(self, slots: list[int]) -> None:  # noqa: B027 - optional hook
        """The sequences in `slots` ended; an executor may drop per-slot state it keeps."""

    def shutdown(self) -> None:  # noqa: B027 - optional hook
        """Free what the executor started (actors, placement groups)."""

    def take_expert_counts(self) -> dict[int, list[int]]:
        """(token, expert) pairs the gate of each MoE layer routed per expert since the last call
        ({layer: [num_experts]}); {} where the executor does not see the gate (a metrics input)."""
        return {}

    # Seconds without work after which the engine calls `idle()`; None: never.
    idle_after_s: float | None = None

    def idle(self) -> None:  # noqa: B027 - optional hook
        """The engine has had no work for `idle_after_s`: release what costs while waiting (the
        next `execute` takes it back)."""

    def take_step_telemetry(self) -> list[StepTelemetry]:
        """What each step since the last call cost inside the executor, oldest first: [] for an
        executor of one process (a metrics input)."""
        return []


def check_cache_sizes(num_slots: int, block_size: int, num_kv_blocks: int | None) -> None:
    """An executor's cache arguments, checked before anything is allocated."""
    if num_slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if num_kv_blocks is not None and num_kv_blocks < 1:
        raise ValueError(f"num_kv_blocks must be >= 1, got {num_kv_blocks}")


_REGISTRY: dict[str, Callable[..., Executor]] = {}


def register_executor(name: str) -> Callable[[Callable[..., Executor]], Callable[..., Executor]]:
    def deco(factory: Callable[..., Executor]) -> Callable[..., Executor]:
        _REGISTRY[name] = factory
        return factory
    return deco


def create_executor(name: str, **kwargs) -> Executor:
    # Executors register on import: `local` here, `cluster` when cluster.executor is imported
    # (engine must not import cluster/).
    if name not in _REGISTRY:
        import engine.local_executor  # noqa: F401
    if name not in _REGISTRY:
        raise ValueError(f"unknown executor {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)
