"""Per-request latency at the boundary where a request's outputs leave the engine: a wrapper
around an engine's `generate` stream that times the first token (TTFT), the gaps after it (TPOT)
and the whole request, and counts how requests finish. Works on any engine whose outputs carry
`new_token_ids`, `finished` and `finish_reason` (engine.llm_engine.RequestOutput)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

from monitoring.definitions import FINISH_REASONS
from monitoring.sink import MetricsSink


class RequestTimer:
    def __init__(self, sink: MetricsSink, clock: Callable[[], float] = time.monotonic) -> None:
        self.sink, self.clock = sink, clock
        self.start = clock()
        self.first: float | None = None
        self.num_tokens = 0
        self.done = False

    def on_tokens(self, n: int) -> None:
        if n and self.first is None:
            self.first = self.clock()
            self.sink.observe("nextserve_time_to_first_token_seconds", self.first - self.start)
        self.num_tokens += n

    def on_finish(self, reason: str | None) -> None:
        if self.done:
            return
        self.done = True
        end = self.clock()
        reason = reason if reason in FINISH_REASONS else "abort"
        self.sink.inc("nextserve_requests_finished", reason=reason)
        if reason in ("abort", "error"):
            return  # a cut-short or failed request's latency says nothing about the server's
        self.sink.observe("nextserve_e2e_request_latency_seconds", end - self.start)
        if self.first is not None and self.num_tokens > 1:
            self.sink.observe("nextserve_time_per_output_token_seconds",
                              (end - self.first) / (self.num_tokens - 1))


class MeteredEngine:
    """An engine with the same `generate` and `stats`, timed per request."""

    def __init__(self, engine: Any, sink: MetricsSink) -> None:
        self.engine, self.sink = engine, sink

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int], params: Any,
                       ) -> AsyncIterator[Any]:
        timer = RequestTimer(self.sink)
        try:
            # Closed here, not by the garbage collector, so a caller that leaves aborts the request
            # in the engine at once.
            stream = self.engine.generate(request_id, prompt_token_ids, params)
            async with contextlib.aclosing(stream) as outs:
                async for out in outs:
                    timer.on_tokens(len(out.new_token_ids))
                    if out.finished:
                        timer.on_finish(out.finish_reason)
                    yield out
        finally:  # refused, failed or abandoned before finishing
            timer.on_finish("abort")

    def stats(self) -> Any:
        return self.engine.stats()

    def __getattr__(self, name: str) -> Any:  # is_alive, shutdown, ... of the wrapped engine
        return getattr(self.engine, name)
