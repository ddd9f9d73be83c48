"""The engine loop: requests in, `step()` = schedule → execute → sample → postprocess, outputs
out. Synchronous and single-threaded; a server drives it from one task and streams what each
step returns."""

from __future__ import annotations

import itertools
from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch

from engine.executor import Executor, StepInput
from engine.sampling import Sampler, SamplingParams
from engine.scheduler import Scheduler, SchedulerConfig, SchedulerOutput
from engine.sequence import Sequence
from engine.tokenizer import Tokenizer


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: the token it sampled and, once finished, why.
    A step that only runs part of a prompt produces none; an aborted request produces none."""

    request_id: str
    new_token_ids: tuple[int, ...]
    new_logprobs: tuple[float, ...] | None  # None unless the request asked for logprobs
    finished: bool
    finish_reason: str | None  # "stop" | "length" once finished
    num_prompt_tokens: int
    num_output_tokens: int  # so far, including new_token_ids


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


class LLMEngine:
    def __init__(self, executor: Executor, tokenizer: Tokenizer | None = None,
                 max_num_seqs: int | None = None, max_num_batched_tokens: int = 2048,
                 max_model_len: int | None = None, eos_token_ids: Seq[int] | None = None) -> None:
        """`max_num_seqs` defaults to the executor's slots and `max_model_len` to its slot length;
        neither may exceed them. EOS ids default to the model config's plus the tokenizer's."""
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
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs,
                                                   max_num_batched_tokens=max_num_batched_tokens,
                                                   max_model_len=max_model_len), executor.num_slots)
        if eos_token_ids is None:
            eos_token_ids = [*self.config.eos_token_ids, *(tokenizer.eos_token_ids if tokenizer else ())]
        self.eos_token_ids = frozenset(eos_token_ids)
        self.sampler = Sampler()
        self._requests: dict[str, Sequence] = {}  # unfinished requests
        self._ids = itertools.count()
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

    @property
    def stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(num_running=len(s.running), num_waiting=len(s.waiting),
                           num_slots_used=s.slots.num_used, num_slots=s.slots.num_slots, **self._counters)

    # -- the loop ----------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        sched = self.scheduler.schedule()
        if sched.is_empty:
            return []
        step = self._step_input(sched)
        sampling = [c.seq for c in sched.chunks if c.samples]
        logits = self.executor.execute(step)  # [len(sampling), V]
        for chunk in sched.chunks:
            chunk.seq.num_computed_tokens += chunk.num_tokens
        outputs = self._sample_and_finish(sampling, logits) if sampling else []
        self._count(sched, len(sampling))
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
    def _step_input(self, sched: SchedulerOutput) -> StepInput:
        token_ids: list[int] = []
        logits_index: list[int] = []
        for c in sched.chunks:
            token_ids += c.seq.token_slice(c.start, c.start + c.num_tokens)
            if c.samples:
                logits_index.append(len(token_ids) - 1)
        return StepInput(token_ids=tuple(token_ids),
                         slots=tuple(c.seq.slot for c in sched.chunks),
                         starts=tuple(c.start for c in sched.chunks),
                         lengths=tuple(c.num_tokens for c in sched.chunks),
                         logits_index=tuple(logits_index))

    def _sample_and_finish(self, seqs: list[Sequence], logits: torch.Tensor) -> list[RequestOutput]:
        for seq in seqs:
            if seq.generator is None and not seq.params.greedy:
                seq.generator = seq.params.make_generator(logits.device)
        out = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs])
        token_ids, logprobs = out.token_ids.tolist(), out.logprobs.tolist()
        outputs = []
        for seq, tok, lp in zip(seqs, token_ids, logprobs, strict=True):
            seq.append(tok, lp)
            reason = self._stop_reason(seq)
            if reason is not None:
                self._release(self.scheduler.finish(seq, reason))
                del self._requests[seq.request_id]
                self._counters["num_finished"] += 1
            outputs.append(RequestOutput(
                request_id=seq.request_id, new_token_ids=(tok,),
                new_logprobs=(lp,) if seq.params.logprobs else None, finished=seq.is_finished,
                finish_reason=seq.finish_reason, num_prompt_tokens=seq.num_prompt_tokens,
                num_output_tokens=seq.num_output_tokens))
        return outputs

    def _stop_reason(self, seq: Sequence) -> str | None:
        tok, p = seq.output_token_ids[-1], seq.params
        if tok in p.stop_token_ids or (not p.ignore_eos and tok in self.eos_token_ids):
            return "stop"
        if seq.num_output_tokens >= p.max_tokens or seq.num_tokens >= self.scheduler.config.max_model_len:
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
