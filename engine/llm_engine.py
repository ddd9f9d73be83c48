"""The engine loop: requests in, `step()` = schedule → execute → sample → process, outputs out.
Synchronous and single-threaded; a server drives it from one task and streams what each step
returns. A request whose data breaks a step fails alone; the others go on unchanged."""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine import row_sampler
from engine.detokenizer import IncrementalDetokenizer
from engine.executor import Executor, ExecutorStateLostError, StepInput
from engine.output_processor import (
    OutputProcessor,
    PromptRow,
    RequestOutput,
    Sampled,
    TopLogprobs,
    merged,
)
from engine.prefix_cache import state_bytes
from engine.sampling import Sampler, SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence, SequenceStatus
from engine.spec_decode import plan_drafts
from engine.structured_output import StructuredOutputManager
from engine.tokenizer import Tokenizer

# RequestOutput and TopLogprobs are defined with the output processor and imported from here.
__all__ = ["Completion", "EngineStats", "LLMEngine", "RequestOutput", "StepHook", "TopLogprobs"]
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """A finished request as `LLMEngine.generate` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: str  # "stop" | "length" | "abort" | "error"
    text: str | None  # decoded output when the engine has a tokenizer
    error: str | None = None  # why the request failed (finish_reason "error")


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for a metrics hook; counters are totals since the engine started."""

    num_running: int
    num_waiting: int
    num_slots_used: int
    num_slots: int
    num_steps: int
    num_prompt_tokens: int  # prompt tokens computed
    num_generated_tokens: int
    num_finished: int
    last_step_num_tokens: int
    last_step_num_seqs: int
    num_preemptions: int  # running sequences preempted for want of KV-cache blocks
    num_kv_blocks_used: int
    num_kv_blocks: int  # the KV cache's blocks; 0: unlimited (a model without attention layers)
    # Prefix caching (engine/prefix_cache.py; all 0 when it is off): tokens of admitted sequences
    # looked up and found cached, cached KV blocks reused for other tokens, DeltaNet states saved
    # (held now, the pool's entries, their bytes in the executor) and evicted.
    prefix_cache_queried_tokens: int = 0
    prefix_cache_hit_tokens: int = 0
    prefix_cache_block_evictions: int = 0
    prefix_cache_states: int = 0
    prefix_cache_state_entries: int = 0
    prefix_cache_state_bytes: int = 0
    prefix_cache_state_evictions: int = 0
    # Speculative decoding (engine.speculative_tokens; all 0 when off), as vLLM's spec-decode
    # metrics: verify chunks (one per sequence and step with drafts), draft tokens proposed to them,
    # drafts accepted, and drafts accepted at each draft position (first draft, second, ...).
    spec_decode_num_drafts: int = 0
    spec_decode_num_draft_tokens: int = 0
    spec_decode_num_accepted_tokens: int = 0
    spec_decode_accepted_per_pos: tuple[int, ...] = ()
    # engine.compile: decode batch buckets compiled so far, and whether the others are compiling
    # in the background (their steps run eagerly meanwhile).
    compiled_buckets: tuple[int, ...] = ()
    compiling: bool = False
    compile_error: str = ""  # why a compile failed ("" none): the steps it was for run eagerly


StepHook = Callable[[EngineStats, float, dict[int, list[int]]], None]


class LLMEngine:
    def __init__(self, executor: Executor, tokenizer: Tokenizer | None = None,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, eos_token_ids: Seq[int] | None = None,
                 max_state_recoveries: int = 3, enable_prefix_caching: bool = True,
                 prefix_cache_state_interval: int = 32) -> None:
        """`max_num_seqs` defaults to the executor's slots and `max_model_len` to its slot length;
        neither may exceed them. The KV-cache blocks are the executor's (`block_size`,
        `num_kv_blocks`): fewer than every slot at max_model_len means sequences may be preempted
        and recomputed. EOS ids default to the model config's plus the tokenizer's.
        `max_state_recoveries`: steps in a row that may lose the executor's state (an actor died)
        and be recomputed before the error reaches the caller. `enable_prefix_caching`: reuse the
        KV blocks and DeltaNet states of earlier requests' prefixes (engine/prefix_cache.py) where
        the executor supports it, with its `num_state_snapshots` saved states, one saved along a
        prompt each `prefix_cache_state_interval` blocks."""
        self.executor = executor
        self.tokenizer = tokenizer
        self.config = executor.config
        max_num_seqs = executor.num_slots if max_num_seqs is None else max_num_seqs
        max_model_len = executor.max_model_len if max_model_len is None else max_model_len
        if max_num_seqs > executor.num_slots:
            raise ValueError(f"max_num_seqs={max_num_seqs} exceeds the executor's {executor.num_slots} slots")
        if max_model_len > executor.max_model_len:
            raise ValueError(f"max_model_len={max_model_len} exceeds the executor's slot length "
                             f"{executor.max_model_len}")
        # A model without attention layers caches nothing per token: no block is ever short.
        has_kv = "full_attention" in self.config.layer_types
        caching = enable_prefix_caching and executor.supports_prefix_caching
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs,
                                                   max_num_batched_tokens=max_num_batched_tokens,
                                                   max_model_len=max_model_len,
                                                   block_size=executor.block_size,
                                                   num_kv_blocks=executor.num_kv_blocks if has_kv else None),
                                   executor.num_slots,
                                   num_prefix_states=executor.num_state_snapshots if caching else None,
                                   needs_state=bool(self.config.deltanet_layers),
                                   state_interval=prefix_cache_state_interval,
                                   num_speculative_tokens=executor.speculative_tokens)
        self.speculative_tokens = executor.speculative_tokens
        if self.scheduler.prefix is not None and self.config.deltanet_layers:
            n = executor.num_state_snapshots
            log.info("prefix caching: %d saved DeltaNet states of %.2f MiB each (%.1f MiB), one along a "
                     "prompt each %d blocks", n, state_bytes(self.config) / 2**20,
                     n * state_bytes(self.config) / 2**20, prefix_cache_state_interval)
        if eos_token_ids is None:
            eos_token_ids = [*self.config.eos_token_ids, *(tokenizer.eos_token_ids if tokenizer else ())]
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampler = Sampler(self.eos_token_ids)  # min_tokens masks them
        self.processor = OutputProcessor(self.eos_token_ids, self.scheduler.max_seq_len)
        self._requests: dict[str, Sequence] = {}  # unfinished requests
        # Structured outputs: made on the first request that asks for them; requests whose
        # grammar is still compiling wait here, outside the scheduler (engine/structured_output.py).
        self.structured: StructuredOutputManager | None = None
        self._compiling: dict[str, tuple[Sequence, concurrent.futures.Future]] = {}
        self.max_state_recoveries = max_state_recoveries
        self._state_losses = 0  # steps in a row that lost the executor's state
        self._ids = itertools.count()
        # Called after every step with (stats, step seconds, the gate's per-expert counts).
        self.step_hooks: list[StepHook] = []
        self._counters = dict(num_steps=0, num_prompt_tokens=0, num_generated_tokens=0, num_finished=0,
                              last_step_num_tokens=0, last_step_num_seqs=0)
        self._spec = dict(spec_decode_num_drafts=0, spec_decode_num_draft_tokens=0,
                          spec_decode_num_accepted_tokens=0)
        self._accepted_per_pos = [0] * self.speculative_tokens

    # -- requests ----------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt_token_ids: Seq[int],
                    params: SamplingParams | None = None) -> None:
        """Queue a request; raises ValueError (PromptTooLongError for a long prompt) on bad input."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        ids = list(prompt_token_ids)
        if not ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        vocab = self.config.vocab_size
        bad = next((t for t in ids if not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:
            raise ValueError(f"request {request_id!r}: token id {bad!r} is out of range for "
                             f"vocab_size {vocab}")
        params = params or SamplingParams()
        bad = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if bad is not None:  # the sampler indexes the logits with them
            raise ValueError(f"request {request_id!r}: logit_bias names token id {bad}, out of range for "
                             f"vocab_size {vocab}")
        seq = Sequence(request_id, ids, params)
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.params.stop,
                                                     min_tokens=seq.params.min_tokens)
        elif seq.params.stop:
            raise ValueError(f"request {request_id!r}: stop strings need a tokenizer; the model has none")
        structured = seq.params.structured_outputs
        if structured is None:
            self.scheduler.add(seq)
        else:
            self.scheduler.check(seq)
            manager = self._structured_manager(request_id)
            compiled = manager.cached(structured)
            if compiled is not None:
                seq.grammar = manager.new_state(compiled)
                self.scheduler.add(seq)
            else:  # compiled off the engine thread; the request is scheduled once it is ready
                self._compiling[request_id] = (seq, manager.submit(structured))
        self._requests[request_id] = seq

    def _structured_manager(self, request_id: str) -> StructuredOutputManager:
        if self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: structured outputs need a tokenizer; the model "
                             f"has none")
        if self.structured is None:
            self.structured = StructuredOutputManager(self.tokenizer, self.config.vocab_size,
                                                      self.eos_token_ids)
        return self.structured

    def abort_request(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its slot; False if it is not unfinished."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return False
        if self._compiling.pop(request_id, None) is not None:
            # Its compile is not cancelled: another request may share it, and it ends in the cache.
            seq.status, seq.finish_reason = SequenceStatus.FINISHED, "abort"
            return True
        self.scheduler.finish(seq, "abort")
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._compiling)

    def unfinished_request_ids(self) -> list[str]:
        return list(self._requests)

    @property
    def stats(self) -> EngineStats:
        s, p = self.scheduler, self.scheduler.prefix
        buckets, compiling = self.executor.compiled_buckets()
        cache = {} if p is None else dict(
            prefix_cache_queried_tokens=p.queried_tokens, prefix_cache_hit_tokens=p.hit_tokens,
            prefix_cache_block_evictions=s.blocks.num_evictions, prefix_cache_states=p.num_states_held,
            prefix_cache_state_entries=p.num_states,
            prefix_cache_state_bytes=p.num_states * state_bytes(self.config),
            prefix_cache_state_evictions=p.state_evictions)
        return EngineStats(num_running=len(s.running), num_waiting=len(s.waiting) + len(self._compiling),
                           num_slots_used=s.slots.num_used, num_slots=s.slots.num_slots,
                           num_preemptions=s.num_preemptions, num_kv_blocks_used=s.blocks.num_used,
                           num_kv_blocks=s.blocks.num_blocks or 0, **cache, **self._counters, **self._spec,
                           spec_decode_accepted_per_pos=tuple(self._accepted_per_pos),
                           compiled_buckets=buckets, compiling=compiling,
                           compile_error=self.executor.compile_error())

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        refused = self._admit_compiled() if self._compiling else []
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return refused
        step, sample_rows, prompt_rows = self._step_input(sched)
        try:
            logits = self.executor.execute(step)  # [len(step.logits_index), V]
        except ExecutorStateLostError as e:
            self._recompute_after(e)
            return []
        except Exception as e:
            if self.scheduler.prefix is not None:  # its saves may or may not have run
                self.scheduler.prefix.discard(step.state_saves)
            return self._execute_failed(sched, e)
        self._state_losses = 0
        for chunk in sched.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        plain = tuple(c for c in sched.chunks if not c.num_drafts)
        self.scheduler.computed(plain)  # verify chunks: once their accepted drafts are known
        if prompt_rows:
            self.processor.score_prompts(logits, prompt_rows)
        sampling = [c for c in sched.chunks if c.samples]
        outputs = []
        emitted: dict[Sequence, int] = {}
        if sampling:
            outputs = self._sample_and_process(sampling, logits, sample_rows, emitted)
            self._finish(outputs)
        verified = tuple(c for c in sched.chunks if c.num_drafts and not c.seq.is_finished)
        for c in verified:  # the accepted drafts are in the output now: computed
            c.seq.num_computed_tokens += emitted[c.seq] - 1
        self.scheduler.computed(verified)
        if self.speculative_tokens:
            self._propose(sched, emitted)
        outputs = refused + outputs
        self._count(sched, outputs)
        if self.step_hooks:  # metrics (monitoring/engine_metrics.py), after the step's bookkeeping
            counts = self.executor.take_expert_counts()
            stats, seconds = self.stats, time.perf_counter() - start
            for hook in self.step_hooks:
                hook(stats, seconds, counts)
        return outputs

    def generate(self, prompts: Seq[Seq[int]], params: SamplingParams | Seq[SamplingParams] | None = None,
                 ) -> list[Completion]:
        """Run `prompts` to completion, batched; results in prompt order. For offline use: the
        engine must have no other requests, whose outputs this loop would swallow."""
        if self.has_unfinished():
            raise RuntimeError("generate() needs an idle engine; drive step() yourself instead")
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [f"gen-{next(self._ids)}" for _ in prompts]
        seqs = []
        try:
            for rid, prompt, p in zip(ids, prompts, params, strict=True):
                self.add_request(rid, prompt, p)
                seqs.append(self._requests[rid])
            while self.has_unfinished():
                self.step()
        finally:  # nothing half-done stays behind an exception
            for rid in ids:
                self.abort_request(rid)
        return [self._completion(s) for s in seqs]

    # -- helpers -----------------------------------------------------------------------------
    def _admit_compiled(self) -> list[RequestOutput]:
        """Schedule the requests whose grammar compiled; fail those whose grammar did not. With
        nothing else to run, wait a little for a compile rather than spin."""
        if not self.scheduler.has_unfinished():
            concurrent.futures.wait([f for _, f in self._compiling.values()], timeout=0.01,
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        failed = []
        for request_id, (seq, future) in list(self._compiling.items()):
            if not future.done():
                continue
            del self._compiling[request_id]
            try:
                seq.grammar = self.structured.new_state(future.result())  # type: ignore[union-attr]
                self.scheduler.add(seq)
            except Exception as e:
                log.warning("request %s: its structured output spec failed: %s", request_id, e)
                failed.append(self.processor.failed(seq, f"structured outputs: {e}"))
                del self._requests[request_id]
                seq.status, seq.finish_reason, seq.error = SequenceStatus.FINISHED, "error", failed[-1].error
        return failed

    def _recompute_after(self, error: ExecutorStateLostError) -> None:
        """The executor lost every slot's cache: recompute each running sequence from its prompt
        and the tokens it already produced (a chunked prefill, which samples the same next token
        under greedy decoding), or re-raise once the executor could not recover or keeps failing."""
        self._state_losses += 1
        running = list(self.scheduler.running)
        self.scheduler.lost_state()  # also forgets every cached prefix: its blocks and states are gone
        if not error.recovered or self._state_losses > self.max_state_recoveries:
            self._state_losses = 0  # the caller ends these requests; later ones start afresh
            raise error
        log.warning("executor state lost (%s); recomputing %d running sequences, attempt %d of %d",
                    error, len(running), self._state_losses, self.max_state_recoveries)

    def _step_input(self, sched: SchedulerOutput,
                    ) -> tuple[StepInput, list[int], list[PromptRow]]:
        """The step, the logits rows to sample from, and (seq, row, position) of each prompt
        position whose logits score the prompt's next token (requests with prompt_logprobs)."""
        token_ids: list[int] = []
        logits_index: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[PromptRow] = []
        for c in sched.chunks:
            offset = len(token_ids)
            token_ids += c.seq.token_slice(c.start, c.start + c.num_tokens)
            if c.seq.params.prompt_logprobs is not None:
                # Position j's logits score prompt token j + 1; the last prompt position samples.
                # A recomputed prompt (after lost state) is not scored twice.
                first = max(c.start, len(c.seq.prompt_logprobs) - 1)
                for j in range(first, min(c.start + c.num_tokens, c.seq.num_prompt_tokens - 1)):
                    prompt_rows.append((c.seq, len(logits_index), j))
                    logits_index.append(offset + j - c.start)
            if c.num_drafts:  # a verify chunk: the real token's row and each draft's
                token_ids += c.seq.draft_token_ids[:c.num_drafts]
                sample_rows.append(len(logits_index))
                logits_index += range(len(token_ids) - 1 - c.num_drafts, len(token_ids))
            elif c.samples:
                sample_rows.append(len(logits_index))
                logits_index.append(len(token_ids) - 1)
        blocks, prefix = self.scheduler.blocks, self.scheduler.prefix
        tables = tuple(blocks.table(c.seq) for c in sched.chunks) if blocks.limited else None
        saves, loads = prefix.take_ops() if prefix is not None else ((), ())
        step = StepInput(token_ids=tuple(token_ids),
                         slots=tuple(c.seq.slot for c in sched.chunks),
                         starts=tuple(c.start for c in sched.chunks),
                         lengths=tuple(c.num_tokens + c.num_drafts for c in sched.chunks),
                         logits_index=tuple(logits_index),
                         block_tables=tables, state_saves=saves, state_loads=loads,
                         num_drafts=tuple(c.num_drafts for c in sched.chunks)
                         if any(c.num_drafts for c in sched.chunks) else ())
        return step, sample_rows, prompt_rows

    def _execute_failed(self, sched: SchedulerOutput, error: Exception) -> list[RequestOutput]:
        """The executor raised: the step's sequences' caches are unreliable. A sequence that failed
        a step of its own fails alone; the sequences of a shared step are each recomputed alone
        (Scheduler.isolate), which finds the culprit. Every isolated sequence either fails or gets
        past the failed step, so this cannot loop. An executor that says it is unhealthy failed
        for its own reasons, not a request's: the error goes to the caller, as lost state does."""
        if not getattr(self.executor, "healthy", lambda: True)():
            raise error
        seqs = [c.seq for c in sched.chunks]
        if len(seqs) == 1 and self.scheduler.is_isolated(seqs[0]):
            seq = seqs[0]
            log.error("request %s failed the model step on its own: %s", seq.request_id, error,
                      exc_info=error)
            output = self.processor.failed(seq, f"the model step failed: {type(error).__name__}: {error}")
            self._finish([output])
            return [output]
        log.warning("a step of %d sequences failed (%s: %s); recomputing each alone", len(seqs),
                    type(error).__name__, error, exc_info=error)
        self.scheduler.isolate(sched.chunks)
        return []

    def _sample_and_process(self, chunks: list[ScheduledChunk], logits: torch.Tensor, sample_rows: list[int],
                            emitted: dict[Sequence, int]) -> list[RequestOutput]:
        """Sample the chunks that reach their sequence's newest token (verify chunks: verify their
        drafts) and turn the tokens into outputs, one per sequence. `emitted` receives the tokens
        each verify chunk's sequence took (accepted drafts + 1)."""
        plain = [(c, r) for c, r in zip(chunks, sample_rows, strict=True) if not c.num_drafts]
        spec = [(c, r) for c, r in zip(chunks, sample_rows, strict=True) if c.num_drafts]
        outputs: dict[Sequence, RequestOutput] = {}
        if plain:
            seqs = [c.seq for c, _ in plain]
            rows = logits[[r for _, r in plain]]  # [len(plain), V]
            sampled = row_sampler.sample(self.sampler, seqs, rows, self.structured)
            processed = self.processor.process(seqs, rows, sampled)
            outputs.update(zip(seqs, processed, strict=True))
        if spec:
            tokens = row_sampler.verify_drafts(self.sampler, [c for c, _ in spec],
                                               [logits[r:r + c.num_drafts + 1] for c, r in spec])
            # Each emitted token goes through the output processor as if sampled in a step of its
            # own (stop checks, text, logprobs); a sequence that stops drops the rest.
            for j in range(self.speculative_tokens + 1):
                live = [(c, r, t) for (c, r), t in zip(spec, tokens, strict=True)
                        if not isinstance(t, Exception) and j < len(t[0]) and not c.seq.is_finished
                        and not (c.seq in outputs and outputs[c.seq].finished)]
                failed = [(c, t) for (c, _), t in zip(spec, tokens, strict=True) if isinstance(t, Exception)]
                if j == 0:
                    for c, t in failed:
                        outputs[c.seq] = self.processor.failed(c.seq, f"sampling failed: "
                                                                      f"{type(t).__name__}: {t}")
                if not live:
                    break
                seqs = [c.seq for c, _, _ in live]
                rows = logits[[r + j for _, r, _ in live]]
                sampled: list[Sampled] = [(t[0][j], t[1][j]) for _, _, t in live]
                for seq, o in zip(seqs, self.processor.process(seqs, rows, sampled), strict=True):
                    outputs[seq] = o if seq not in outputs else merged(outputs[seq], o)
            for (c, _), t in zip(spec, tokens, strict=True):
                if not isinstance(t, Exception):
                    emitted[c.seq] = len(t[0])
                    self._count_spec(c.num_drafts, len(t[0]) - 1)
        return [outputs[c.seq] for c in chunks]

    def _count_spec(self, num_drafts: int, accepted: int) -> None:
        self._spec["spec_decode_num_drafts"] += 1
        self._spec["spec_decode_num_draft_tokens"] += num_drafts
        self._spec["spec_decode_num_accepted_tokens"] += accepted
        for j in range(accepted):
            self._accepted_per_pos[j] += 1

    def _propose(self, sched: SchedulerOutput, emitted: dict[Sequence, int]) -> None:
        """Draft tokens for the step's sequences from the executor's drafter, which also caches
        every chunk's tokens. A sequence drafts only where its next step could use them all: below
        max_tokens and the longest sequence; one with structured outputs not at all."""
        accepted, next_ids, num_drafts = plan_drafts(sched.chunks, emitted, self.speculative_tokens,
                                                     self.scheduler.max_seq_len)
        try:
            drafts = self.executor.propose(accepted, next_ids, num_drafts)
        except Exception as e:
            # The rollback may not have run: the sequences are recomputed from their tokens alone.
            log.exception("drafting failed (%s); recomputing the step's sequences", e)
            running = tuple(ScheduledChunk(c.seq, 0, c.seq.num_computed_tokens) for c in sched.chunks
                            if c.seq.status is SequenceStatus.RUNNING)
            self.scheduler.isolate(running)
            return
        for c, d in zip(sched.chunks, drafts, strict=True):
            c.seq.draft_token_ids = list(d)

    def _finish(self, outputs: list[RequestOutput]) -> None:
        """Give back the slots of the requests that `outputs` finish."""
        for o in outputs:
            if o.finished:
                seq = self._requests.pop(o.request_id)
                self.scheduler.finish(seq, o.finish_reason)
                seq.error = o.error
                if o.error is None:
                    self._counters["num_finished"] += 1

    def _count(self, sched: SchedulerOutput, outputs: list[RequestOutput]) -> None:
        c = self._counters
        c["num_steps"] += 1
        c["num_prompt_tokens"] += sum(min(ch.num_tokens, max(0, ch.seq.num_prompt_tokens - ch.start))
                                      for ch in sched.chunks)
        c["num_generated_tokens"] += sum(len(o.new_token_ids) for o in outputs)
        c["last_step_num_tokens"] = sched.num_tokens
        c["last_step_num_seqs"] = len(sched.chunks)

    def _completion(self, seq: Sequence) -> Completion:
        text = self.tokenizer.decode(seq.output_token_ids) if self.tokenizer else None
        return Completion(request_id=seq.request_id, prompt_token_ids=tuple(seq.prompt_token_ids),
                          token_ids=tuple(seq.output_token_ids),
                          logprobs=tuple(seq.output_logprobs) if seq.params.logprobs else None,
                          finish_reason=seq.finish_reason or "abort", text=text, error=seq.error)

