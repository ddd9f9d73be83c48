"""Continuous batching: which sequences run in the next step and how many tokens each brings.

A plain state machine over two queues. Each step first gives every running sequence in decode
one token, then continues running prefills, then admits waiting sequences (a free slot each),
all within the step's token budget; a prompt that does not fit is split over several steps
(chunked prefill) and shares them with decode. Every chunk needs KV-cache blocks for its tokens
(engine/block_manager.py); a running sequence that finds none free preempts the most recently
admitted one, which gives back its slot and blocks and is recomputed later (vLLM's recompute
policy: prompt + output prefilled again, the next token sampled from that). The sequences of a
step the executor failed are isolated: each is recomputed in steps of its own, so a request whose
data breaks the model fails alone (`isolate`). With prefix caching (engine/prefix_cache.py) an
admitted sequence resumes after its longest cached prefix, and prefill chunks end where DeltaNet
states are saved. Speculative decoding (`num_speculative_tokens` k > 0): a decoding sequence brings its
draft tokens after its newest token (ScheduledChunk.num_drafts, cut to the step's budget), and
every chunk reserves KV-cache blocks for k positions past its end, where the drafter writes
its own cache before the next step verifies."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager, blocks_for
from engine.prefix_cache import PrefixCache
from engine.sequence import Sequence, SequenceStatus


class PromptTooLongError(ValueError):
    """A prompt that cannot fit in a sequence slot or in the KV cache; refused when added."""


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 8  # sequences running at once (each holds a cache slot)
    max_num_batched_tokens: int = 2048  # tokens of one step, prefill chunks and decode together
    max_model_len: int = 4096  # prompt + output tokens of one sequence
    block_size: int = 16  # tokens per KV-cache block
    num_kv_blocks: int | None = None  # the KV cache's blocks; None: unlimited (never preempts)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        blocks = self.num_kv_blocks
        if blocks is not None and (not isinstance(blocks, int) or blocks < 1):
            raise ValueError(f"num_kv_blocks must be an integer >= 1 or None, got {blocks!r}")
        # Every running sequence must be able to decode in every step, or decodes would starve.
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be >= "
                             f"max_num_seqs ({self.max_num_seqs})")


class SlotAllocator:
    """Free list over the executor's cache slots. A slot needs no clearing when reused: a sequence
    that starts at position 0 ignores what the previous owner left (model/cache.py)."""

    def __init__(self, num_slots: int) -> None:
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
    """`num_tokens` new tokens of `seq`, from its `start`-th token on, then `num_drafts` of its
    draft tokens to verify."""

    seq: Sequence
    start: int
    num_tokens: int
    num_drafts: int = 0

    @property
    def samples(self) -> bool:
        """The chunk reaches the sequence's newest token, so the step samples its next one."""
        return self.start + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    chunks: tuple[ScheduledChunk, ...]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens + c.num_drafts for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class _StepPlan:
    """The chunks of the step being scheduled and the token budget left."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.chunks: list[ScheduledChunk] = []

    def add(self, seq: Sequence, num_tokens: int, num_drafts: int = 0) -> None:
        self.chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens, num_drafts))
        self.budget -= num_tokens + num_drafts

    def drop(self, seq: Sequence) -> None:
        for chunk in self.chunks:
            if chunk.seq is seq:
                self.chunks.remove(chunk)
                self.budget += chunk.num_tokens + chunk.num_drafts
                return


class Scheduler:
    def __init__(self, config: SchedulerConfig, num_slots: int, num_prefix_states: int | None = None,
                 needs_state: bool = False, state_interval: int = 32,
                 num_speculative_tokens: int = 0) -> None:
        """`num_prefix_states` None: no prefix caching; else the DeltaNet snapshot entries the
        executor keeps (`needs_state`: the model has DeltaNet layers; `state_interval`: blocks
        between saved states along a prompt). `num_speculative_tokens`: most drafts per sequence."""
        self.config = config
        self.num_speculative_tokens = num_speculative_tokens
        self.slots = SlotAllocator(num_slots)
        self.blocks = BlockManager(config.num_kv_blocks, config.block_size)
        self.prefix: PrefixCache | None = None
        if num_prefix_states is not None:
            self.prefix = PrefixCache(self.blocks, config.block_size, num_prefix_states, needs_state,
                                      state_interval)
        self.waiting: deque[Sequence] = deque()
        self.running: deque[Sequence] = deque()  # in order of admission, the newest last
        self.num_preemptions = 0
        # Isolated sequences, in order, each with the token count its solo recompute must reach.
        self.isolated: dict[Sequence, int] = {}

    @property
    def max_seq_len(self) -> int:
        """Most tokens (prompt + output) a sequence may reach: max_model_len, or fewer where the
        whole KV cache holds fewer."""
        if self.config.num_kv_blocks is None:
            return self.config.max_model_len
        return min(self.config.max_model_len, self.config.num_kv_blocks * self.config.block_size)

    def add(self, seq: Sequence) -> None:
        self.check(seq)
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def check(self, seq: Sequence) -> None:
        """Raise PromptTooLongError if `seq`'s prompt can never run (what `add` refuses)."""
        limit = self.config.max_model_len
        if seq.num_prompt_tokens > limit:
            raise PromptTooLongError(f"prompt of request {seq.request_id!r} has {seq.num_prompt_tokens} "
                                     f"tokens, more than max_model_len={limit}")
        if not self.blocks.fits(seq.num_prompt_tokens):
            c = self.config
            raise PromptTooLongError(
                f"prompt of request {seq.request_id!r} has {seq.num_prompt_tokens} tokens, which need "
                f"{blocks_for(seq.num_prompt_tokens, c.block_size)} KV-cache blocks of {c.block_size} "
                f"tokens; the whole cache has {c.num_kv_blocks} blocks ({c.num_kv_blocks * c.block_size} "
                f"tokens, num_kv_blocks)")

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def isolate(self, chunks: tuple[ScheduledChunk, ...]) -> None:
        """The executor failed the step of `chunks`, and their sequences' caches are unreliable
        (DeltaNet state is updated in place layer by layer): recompute each from its first token,
        alone in its steps, up to where the failed step would have taken it. They keep their slots
        and blocks, which already cover that far, so recomputing needs no preemption."""
        for c in chunks:
            c.seq.num_computed_tokens = 0
            c.seq.draft_token_ids = []
            self.isolated[c.seq] = c.start + c.num_tokens

    def is_isolated(self, seq: Sequence) -> bool:
        return seq in self.isolated

    def schedule(self) -> SchedulerOutput:
        alone = self._next_isolated()
        if alone is not None:  # every other sequence waits until the isolated ones are through
            n = min(self.isolated[alone] - alone.num_computed_tokens, self.config.max_num_batched_tokens)
            return SchedulerOutput((ScheduledChunk(alone, alone.num_computed_tokens, n),))
        plan = _StepPlan(self.config.max_num_batched_tokens)
        preempted_before = self.num_preemptions
        # Decode first: one token each (and its drafts while the budget leaves every later decoding
        # sequence its token); the config guarantees the budget, blocks may preempt.
        decoding = [s for s in self.running if not s.is_prefilling]
        for i, seq in enumerate(decoding):
            drafts = min(len(seq.draft_token_ids), max(0, plan.budget - (len(decoding) - i)))
            del seq.draft_token_ids[drafts:]
            if seq.status is SequenceStatus.RUNNING and self._reserve(seq, 1 + drafts, plan):
                plan.add(seq, 1, drafts)
        # Then prefills already under way, oldest first.
        for seq in [s for s in self.running if s.is_prefilling]:
            if seq.status is SequenceStatus.RUNNING and plan.budget > 0:
                n = self._chunk(seq, seq.num_computed_tokens, min(seq.num_uncomputed_tokens, plan.budget))
                if self._reserve(seq, n, plan):
                    plan.add(seq, n)
        # Then admit waiting sequences, oldest (and preempted) first, while there is budget, a
        # slot, room in the batch and blocks for the chunk; not in a step that had to preempt.
        while (self.waiting and plan.budget > 0 and self.slots.num_free > 0
               and len(self.running) < self.config.max_num_seqs and self.num_preemptions == preempted_before):
            seq = self.waiting[0]
            hit = self.prefix.match(seq) if self.prefix is not None else None
            start = hit.num_blocks * self.config.block_size if hit else seq.num_computed_tokens
            n = self._chunk(seq, start, min(seq.num_tokens - start, plan.budget))
            if not self.blocks.can_allocate(seq, self._reach(start + n), hit.blocks if hit else ()):
                break
            self.waiting.popleft()
            seq.slot = self.slots.allocate()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            if self.prefix is not None:
                self.prefix.resume(seq, hit)
            self.blocks.allocate(seq, self._reach(seq.num_computed_tokens + n))
            plan.add(seq, n)
        return SchedulerOutput(tuple(plan.chunks))

    def _chunk(self, seq: Sequence, start: int, num_tokens: int) -> int:
        """Tokens of a prefill chunk from `start`: ended early where a DeltaNet state is saved."""
        return num_tokens if self.prefix is None else self.prefix.chunk_limit(seq, start, num_tokens)

    def computed(self, chunks: tuple[ScheduledChunk, ...]) -> None:
        """The step of `chunks` went through (their sequences' computed counts are updated): the
        prefix cache registers their new full blocks and saves states where due."""
        if self.prefix is not None:
            for c in chunks:
                self.prefix.computed(c.seq)

    def lost_state(self) -> None:
        """The executor lost every cache (an actor restarted): nothing cached is trusted any more,
        and every running sequence is recomputed from its first token into the blocks it holds."""
        if self.prefix is not None:
            self.prefix.invalidate()
        for seq in self.running:
            seq.num_computed_tokens = 0
            seq.num_registered_blocks = 0
            seq.draft_token_ids = []
            if self.prefix is not None:
                self.prefix.forget(seq)

    def _next_isolated(self) -> Sequence | None:
        """The first isolated sequence still short of its mark; those past it rejoin the batch."""
        for seq, mark in list(self.isolated.items()):
            if seq.num_computed_tokens < mark:
                return seq
            del self.isolated[seq]
        return None

    def _reserve(self, seq: Sequence, num_tokens: int, plan: _StepPlan) -> bool:
        """Blocks for `seq` to compute `num_tokens` more tokens, preempting the newest running
        sequences until they are free; False if `seq` itself had to be preempted."""
        total = self._reach(seq.num_computed_tokens + num_tokens)
        while not self.blocks.can_allocate(seq, total):
            victim = self.running[-1]
            self._preempt(victim, plan)
            if victim is seq:
                return False
        self.blocks.allocate(seq, total)
        return True

    def _reach(self, num_tokens: int) -> int:
        """Tokens whose blocks a chunk ending at `num_tokens` needs: with speculative decoding, k
        more, where the drafter writes its cache (never past a sequence's longest)."""
        return max(num_tokens, min(num_tokens + self.num_speculative_tokens, self.max_seq_len))

    def _preempt(self, seq: Sequence, plan: _StepPlan) -> None:
        """Give back `seq`'s slot and blocks and queue it first for recompute: its prompt and
        output are prefilled again, and that prefill samples its next token."""
        plan.drop(seq)
        self.isolated.pop(seq, None)  # recomputed from its first token anyway
        self.running.remove(seq)
        self.blocks.free(seq)
        if self.prefix is not None:
            self.prefix.forget(seq)
        self.slots.free(seq.slot)
        seq.slot = None
        seq.num_computed_tokens = 0
        seq.draft_token_ids = []
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence, reason: str) -> None:
        """End `seq` (it must be waiting or running) and give back its slot and blocks."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        self.isolated.pop(seq, None)
        self.blocks.free(seq)
        if self.prefix is not None:
            self.prefix.forget(seq)
        if seq.slot is not None:
            self.slots.free(seq.slot)
            seq.slot = None
