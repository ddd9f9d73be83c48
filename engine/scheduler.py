"""Continuous batching: which sequences run in the next step and how many tokens each brings.

A plain state machine over two queues. Each step first gives every running sequence in decode
one token, then continues running prefills, then admits waiting sequences (a free slot each),
all within the step's token budget; a prompt that does not fit is split over several steps
(chunked prefill) and shares them with decode."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.sequence import Sequence, SequenceStatus


class PromptTooLongError(ValueError):
    """A prompt that cannot fit in a sequence slot; refused at admission."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 8  # sequences running at once (each holds a cache slot)
    max_num_batched_tokens: int = 2048  # tokens of one step, prefill chunks and decode together
    max_model_len: int = 4096  # prompt + output tokens of one sequence

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        # Every running sequence must be able to decode in every step, or decodes would starve.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs})")


class SlotAllocator:
    """Free list over the executor's cache slots. A slot needs no clearing when reused: a sequence
    that starts at position 0 ignores what the previous owner left (model/cache.py)."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {num_slots}")
        self.num_slots = num_slots
        self._free: deque[int] = deque(range(num_slots))
        self._used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return len(self._used)

    def allocate(self) -> int:
        if not self._free:
            raise RuntimeError("no free cache slot")
        slot = self._free.popleft()
        self._used.add(slot)
        return slot

    def free(self, slot: int) -> None:
        if slot not in self._used:
            raise ValueError(f"slot {slot} is not allocated")
        self._used.remove(slot)
        self._free.append(slot)


@dataclass(frozen=True)
class ScheduledChunk:
    """`num_tokens` new tokens of `seq`, from its `start`-th token on."""

    seq: Sequence
    start: int
    num_tokens: int

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's newest token, so the step samples its next one."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_slots: int) -> None:
        self.config = config
        self.slots = SlotAllocator(num_slots)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()

    def add(self, seq: Sequence) -> None:
        limit = self.config.max_model_len
        if seq.num_prompt_tokens > limit:
            raise PromptTooLongError(f"prompt of request {seq.request_id!r} has {seq.num_prompt_tokens} "
                                     f"tokens, more than max_model_len={limit}")
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        # Decode first: one token each, and the config guarantees they all fit.
        for seq in self.running:
            if not seq.is_prefilling:
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, 1))
                budget -= 1
        # Then prefills already under way, oldest first.
        for seq in self.running:
            if seq.is_prefilling and budget > 0:
                n = min(seq.num_uncomputed_tokens, budget)
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
                budget -= n
        # Then admit waiting sequences while there is budget, a slot and room in the batch.
        while (self.waiting and budget > 0 and self.slots.num_free > 0
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting.popleft()
            seq.slot = self.slots.allocate()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(seq.num_uncomputed_tokens, budget)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, n))
            budget -= n
        return SchedulerOutput(tuple(chunks))

    def finish(self, seq: Sequence, reason: str) -> int | None:
        """End `seq` (it must be waiting or running); returns the slot it gave back, if any."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        slot, seq.slot = seq.slot, None
        if slot is not None:
            self.slots.free(slot)
        return slot

    def abort(self, request_id: str) -> Sequence | None:
        """Finish the request with reason "abort"; None if it is not waiting or running."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    self.finish(seq, "abort")
                    return seq
        return None
