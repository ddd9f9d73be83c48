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
    positions whose next-token logits the caller wants (usually each sequence's last token)."""

    token_ids: tuple[int, ...]
    slots: tuple[int, ...]
    starts: tuple[int, ...]
    lengths: tuple[int, ...]
    logits_index: tuple[int, ...]

    def __post_init__(self) -> None:
        if not (len(self.slots) == len(self.starts) == len(self.lengths)):
            raise ValueError("slots, starts and lengths must have one entry per sequence")
        if sum(self.lengths) != len(self.token_ids):
            raise ValueError(f"lengths sum to {sum(self.lengths)} but {len(self.token_ids)} tokens given")
        if any(not 0 <= i < len(self.token_ids) for i in self.logits_index):
            raise ValueError("logits_index points outside the step's tokens")


class Executor(ABC):
    """Runs steps over `num_slots` sequence slots of at most `max_model_len` tokens each."""

    config: ModelConfig
    num_slots: int
    max_model_len: int

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
