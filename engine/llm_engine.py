"""The engine loop: requests in, `step()` = schedule → execute → sample → postprocess, outputs
out. Synchronous and single-threaded; a server drives it from one task and streams what each
step returns."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.detokenizer import IncrementalDetokenizer
from engine.executor import Executor, ExecutorStateLostError, StepInput
from engine.sampling import Sampler, SamplingParams, top_logprobs
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)
TopLogprobs = tuple[tuple[int, float], ...]  # (token id, logprob), likeliest first


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: the token it sampled and, once finished, why.
    A step that only runs part of a prompt produces none; an aborted request produces none.
    `new_text` is the output text that became final this step (engines with a tokenizer); the
    prompt's logprobs come once, with the first sampled token."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[float, ...] | None  # None unless the request asked for logprobs
    finished: bool
    finish_reason: str | None  # "stop" | "length" once finished
    num_prompt_tokens: int
    num_output_tokens: int  # so far, including new_token_ids
    new_text: str = ""
    new_top_logprobs: tuple[TopLogprobs, ...] | None = None  # with params.top_logprobs
    prompt_logprobs: tuple[float | None, ...] | None = None  # with params.prompt_logprobs
    prompt_top_logprobs: tuple[TopLogprobs, ...] | None = None


@dataclass(frozen=True)
class Completion:
    """A finished request as `LLMEngine.generate` returns it."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: tuple[int, ...]
    logprobs: tuple[float, ...] | None
    finish_reason: str
    text: str | None  # decoded output when the engine has a tokenizer


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


StepHook = Callable[[EngineStats, float, dict[int, list[int]]], None]


class LLMEngine:
    def __init__(self, executor: Executor, tokenizer: Tokenizer | None = None,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, eos_token_ids: Seq[int] | None = None,
                 max_state_recoveries: int = 3) -> None:
        """`max_num_seqs` defaults to the executor's slots and `max_model_len` to its slot length;
        neither may exceed them. The KV-cache blocks are the executor's (`block_size`,
        `num_kv_blocks`): fewer than every slot at max_model_len means sequences may be preempted
        and recomputed. EOS ids default to the model config's plus the tokenizer's.
        `max_state_recoveries`: steps in a row that may lose the executor's state (an actor died)
        and be recomputed before the error reaches the caller."""
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
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs,
                                                   max_num_batched_tokens=max_num_batched_tokens,
                                                   max_model_len=max_model_len,
                                                   block_size=executor.block_size,
                                                   num_kv_blocks=executor.num_kv_blocks if has_kv else None),
                                   executor.num_slots)
        if eos_token_ids is None:
            eos_token_ids = [*self.config.eos_token_ids, *(tokenizer.eos_token_ids if tokenizer else ())]
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampler = Sampler()
        self._requests: dict[str, Sequence] = {}  # unfinished requests
        self.max_state_recoveries = max_state_recoveries
        self._state_losses = 0  # steps in a row that lost the executor's state
        self._ids = itertools.count()
        # Called after every step with (stats, step seconds, the gate's per-expert counts).
        self.step_hooks: list[StepHook] = []
        self._counters = dict(num_steps=0, num_prompt_tokens=0, num_generated_tokens=0, num_finished=0,
                              last_step_num_tokens=0, last_step_num_seqs=0)

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
        seq = Sequence(request_id, ids, params or SamplingParams())
        if self.tokenizer is not None:
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, seq.params.stop)
        elif seq.params.stop:
            raise ValueError(f"request {request_id!r}: stop strings need a tokenizer; the model has none")
        self.scheduler.add(seq)
        self._requests[request_id] = seq

    def abort_request(self, request_id: str) -> bool:
        """Drop a waiting or running request and free its slot; False if it is not unfinished."""
        seq = self._requests.pop(request_id, None)
        if seq is None:
            return False
        self._release(self.scheduler.finish(seq, "abort"))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def unfinished_request_ids(self) -> list[str]:
        return list(self._requests)

    @property
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(num_running=len(s.running), num_waiting=len(s.waiting),
                           num_slots_used=s.slots.num_used, num_slots=s.slots.num_slots,
                           num_preemptions=s.num_preemptions, num_kv_blocks_used=s.blocks.num_used,
                           num_kv_blocks=s.blocks.num_blocks or 0, **self._counters)

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        start = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        step, sample_rows, prompt_rows = self._step_input(sched)
        sampling = [c.seq for c in sched.chunks if c.samples]
        try:
            logits = self.executor.execute(step)  # [len(step.logits_index), V]
        except ExecutorStateLostError as e:
            self._recompute_after(e)
            return []
        self._state_losses = 0
        for chunk in sched.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        if prompt_rows:
            self._score_prompts(logits, prompt_rows)
        outputs = self._sample_and_finish(sampling, logits[sample_rows]) if sampling else []
        self._count(sched, len(sampling))
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
    def _recompute_after(self, error: ExecutorStateLostError) -> None:
        """The executor lost every slot's cache: recompute each running sequence from its prompt
        and the tokens it already produced (a chunked prefill, which samples the same next token
        under greedy decoding), or re-raise once the executor could not recover or keeps failing."""
        self._state_losses += 1
        if not error.recovered or self._state_losses > self.max_state_recoveries:
            self._state_losses = 0  # the caller ends these requests; later ones start afresh
            raise error
        running = list(self.scheduler.running)
        for seq in running:
            seq.num_computed_tokens = 0
        log.warning("executor state lost (%s); recomputing %d running sequences, attempt %d of %d",
                    error, len(running), self._state_losses, self.max_state_recoveries)

    def _step_input(self, sched: SchedulerOutput,
                    ) -> tuple[StepInput, list[int], list[tuple[Sequence, int, int]]]:
        """The step, the logits rows to sample from, and (seq, row, position) of each prompt
        position whose logits score the prompt's next token (requests with prompt_logprobs)."""
        token_ids: list[int] = []
        logits_index: list[int] = []
        sample_rows: list[int] = []
        prompt_rows: list[tuple[Sequence, int, int]] = []
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
            if c.samples:
                sample_rows.append(len(logits_index))
                logits_index.append(len(token_ids) - 1)
        blocks = self.scheduler.blocks
        tables = tuple(blocks.table(c.seq) for c in sched.chunks) if blocks.limited else None
        step = StepInput(token_ids=tuple(token_ids),
                         slots=tuple(c.seq.slot for c in sched.chunks),
                         starts=tuple(c.start for c in sched.chunks),
                         lengths=tuple(c.num_tokens for c in sched.chunks),
                         logits_index=tuple(logits_index),
                         block_tables=tables)
        return step, sample_rows, prompt_rows

    def _score_prompts(self, logits: torch.Tensor, prompt_rows: list[tuple[Sequence, int, int]]) -> None:
        rows = torch.tensor([r for _, r, _ in prompt_rows], dtype=torch.long, device=logits.device)
        targets = torch.tensor([s.prompt_token_ids[j + 1] for s, _, j in prompt_rows], dtype=torch.long,
                               device=logits.device)
        n = max(s.params.prompt_logprobs or 0 for s, _, _ in prompt_rows)
        chosen, top_ids, top_lp = top_logprobs(logits[rows], targets, max(n, 1))
        chosen, top_ids, top_lp = chosen.tolist(), top_ids.tolist(), top_lp.tolist()
        for i, (seq, _, _) in enumerate(prompt_rows):
            k = seq.params.prompt_logprobs or 0
            seq.prompt_logprobs.append(chosen[i])
            seq.prompt_top_logprobs.append(tuple(zip(top_ids[i][:k], top_lp[i][:k], strict=True)))

    def _sample_and_finish(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        for seq in seqs:
            if seq.generator is None and not seq.params.greedy:
                seq.generator = seq.params.make_generator(logits.device)
        out = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs])
        token_ids, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
        tops = self._top_logprobs(seqs, logits, out.token_ids)
        outputs = []
        for seq, tok, lp, top in zip(seqs, token_ids, logprobs, tops, strict=True):
            first = seq.num_output_tokens == 0
            seq.append(tok, lp)
            hit_stop_string = seq.detokenizer is not None and seq.detokenizer.add(tok)
            reason = "stop" if hit_stop_string else self._stop_reason(seq)
            if reason is not None:
                self._release(self.scheduler.finish(seq, reason))
                del self._requests[seq.request_id]
                self._counters["num_finished"] += 1
            want_prompt = first and seq.params.prompt_logprobs is not None
            outputs.append(RequestOutput(
                request_id=seq.request_id, new_token_ids=(tok,),
                new_logprobs=(lp,) if seq.params.logprobs else None, finished=seq.is_finished,
                finish_reason=seq.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
                num_output_tokens=seq.num_output_tokens,
                new_text=seq.detokenizer.take(seq.is_finished) if seq.detokenizer else "",
                new_top_logprobs=(top,) if top is not None else None,
                prompt_logprobs=tuple(seq.prompt_logprobs) if want_prompt else None,
                prompt_top_logprobs=tuple(seq.prompt_top_logprobs) if want_prompt else None))
        return outputs

    def _top_logprobs(self, seqs: list[Sequence], logits: torch.Tensor, token_ids: torch.Tensor,
                      ) -> list[TopLogprobs | None]:
        n = max((s.params.top_logprobs for s in seqs if s.params.logprobs), default=0)
        if n == 0:
            return [None] * len(seqs)
        _, top_ids, top_lp = top_logprobs(logits, token_ids, n)
        top_ids, top_lp = top_ids.tolist(), top_lp.tolist()
        return [tuple(zip(top_ids[i][:s.params.top_logprobs], top_lp[i][:s.params.top_logprobs], strict=True))
                if s.params.logprobs else None for i, s in enumerate(seqs)]

    def _stop_reason(self, seq: Sequence) -> str | None:
        tok, p = seq.output_token_ids[-1], seq.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.scheduler.max_seq_len:
            return "length"
        return None

    def _release(self, slot: int | None) -> None:
        if slot is not None:
            self.executor.release([slot])

    def _count(self, sched: SchedulerOutput, num_sampled: int) -> None:
        c = self._counters
        c["num_steps"] += 1
        c["num_prompt_tokens"] += sum(min(ch.num_tokens, max(0, ch.seq.num_prompt_tokens - ch.start))
                                      for ch in sched.chunks)
        c["num_generated_tokens"] += num_sampled
        c["last_step_num_tokens"] = sched.num_tokens
        c["last_step_num_seqs"] = len(sched.chunks)

    def _completion(self, seq: Sequence) -> Completion:
        text = self.tokenizer.decode(seq.output_token_ids) if self.tokenizer else None
        return Completion(request_id=seq.request_id, prompt_token_ids=tuple(seq.prompt_token_ids),
                          token_ids=tuple(seq.output_token_ids),
                          logprobs=tuple(seq.output_logprobs) if seq.params.logprobs else None,
                          finish_reason=seq.finish_reason or "abort", text=text)
