"""An asyncio face for LLMEngine: a background thread runs step() whenever there is work and
feeds each request's outputs to its own asyncio queue, so a server can stream many requests from
one event loop. LLMEngine is not thread-safe; only the engine thread touches it, and callers reach
it through a command queue. Leaving a `generate` stream early (client gone, task cancelled)
aborts the request, which frees its slot. A reader that falls behind the engine gets the outputs
waiting for it merged into one (each streamed event then carries several tokens), so under load
the per-event cost of the HTTP path is paid once per read, not once per token. A request that
fails alone ends with RequestFailedError; a step that fails as a whole ends its requests with
EngineStepError; if the engine thread itself dies, every request, in flight or new, gets
EngineDeadError and `healthy()` turns False."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from typing import Any

from engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from engine.sampling import SamplingParams

log = logging.getLogger(__name__)


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is full; the caller should retry later."""

    def __init__(self, capacity: int, retry_after_s: float) -> None:
        super().__init__(f"the server is at capacity ({capacity} requests in flight); retry later")
        self.retry_after_s = retry_after_s


class EngineStepError(RuntimeError):
    """An engine step failed; the requests in it were ended, the engine lives on."""


class EngineDeadError(EngineStepError):
    """The engine thread has stopped: no request can run on this engine again."""


class RequestFailedError(RuntimeError):
    """This request alone failed (its data broke a model step or its sampling); the engine and
    the other requests go on."""

    def __init__(self, request_id: str, message: str) -> None:
        super().__init__(f"request {request_id} failed: {message}")
        self.request_id = request_id


class RequestTimeoutError(TimeoutError):
    """A request ran past its time limit; it was aborted and its slot freed."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(f"the request did not finish within {timeout_s:g}s (serve.request_timeout_s)")
        self.timeout_s = timeout_s


class EngineFrontend(ABC):
    """The caller's side of an engine, wherever its loop runs (a thread here, a process in
    engine/core_client.py): a queue per request stream, admission, time limits, merging for slow
    readers. A subclass sends "add" and "abort" commands (`_send`) and, back on the event loop,
    calls `_deliver`, `_deliver_error`, `_answer_add` and, once its loop is gone, sets `_death`
    and calls `_end_all_streams`."""

    def __init__(self, max_num_seqs: int, max_queued_requests: int = 64, retry_after_s: float = 1.0,
                 request_timeout_s: float | None = None) -> None:
        """At most max_num_seqs requests run and `max_queued_requests` more wait; beyond that,
        `generate` raises QueueFullError at once rather than letting latency grow unbounded. A
        request still unfinished `request_timeout_s` after it arrived (queueing included) is
        aborted with RequestTimeoutError."""
        if max_queued_requests < 0:
            raise ValueError(f"max_queued_requests must be >= 0, got {max_queued_requests}")
        if request_timeout_s is not None and not request_timeout_s > 0:
            raise ValueError(f"request_timeout_s must be > 0 or None, got {request_timeout_s}")
        self.request_timeout_s = request_timeout_s
        self.capacity = max_num_seqs + max_queued_requests
        self.retry_after_s = retry_after_s
        self._streams: dict[str, asyncio.Queue] = {}
        self._stopped = False
        self._death: str | None = None  # why the engine's loop died, once it has
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def num_in_flight(self) -> int:
        return len(self._streams)

    @abstractmethod
    def _send(self, *command: Any) -> None:
        """Hand a command ("add" or "abort") to the engine's loop."""

    async def generate(self, request_id: str, prompt_token_ids: Sequence[int],
                       params: SamplingParams) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as steps produce them, the last one `finished`. Raises
        ValueError for a prompt the engine refuses, before yielding anything; EngineDeadError
        once the engine's loop has died; RequestFailedError if this request fails alone."""
        if self._death is not None:
            raise EngineDeadError(self._death)
        if self._stopped:
            raise EngineStepError("the engine is shutting down")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        if len(self._streams) >= self.capacity:
            raise QueueFullError(self.capacity, self.retry_after_s)
        self._loop = asyncio.get_running_loop()
        stream: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = stream
        finished = False
        deadline = None if self.request_timeout_s is None else self._loop.time() + self.request_timeout_s
        try:
            self._send("add", request_id, list(prompt_token_ids), params)
            # The first item says whether the engine took the request: None, or the error.
            refused = await self._before(deadline, stream.get())
            if refused is not None:
                finished = True
                raise refused
            while True:
                item = await self._before(deadline, stream.get())
                while isinstance(item, RequestOutput) and not item.finished and not stream.empty():
                    nxt = stream.get_nowait()
                    if isinstance(nxt, BaseException):  # the outputs first, the error next read
                        stream.put_nowait(nxt)
                        break
                    item = merge_outputs(item, nxt)
                if isinstance(item, BaseException):
                    finished = True  # the engine already ended it
                    raise item
                finished = item.finished
                yield item
                if finished:
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._send("abort", request_id)

    async def _before(self, deadline: float | None, awaitable: Any) -> Any:
        """`awaitable`'s result, or RequestTimeoutError once the request's deadline has passed."""
        if deadline is None:
            return await awaitable
        try:
            return await asyncio.wait_for(awaitable, max(0.0, deadline - asyncio.get_running_loop().time()))
        except asyncio.TimeoutError:
            raise RequestTimeoutError(self.request_timeout_s) from None


    # -- back on the event loop --------------------------------------------------------------
    def _deliver(self, outputs: list[RequestOutput]) -> None:
        for o in outputs:
            stream = self._streams.get(o.request_id)
            if stream is None:  # the caller left and its abort is on the way
                continue
            if o.error is not None:  # after the outputs before it, like any error
                stream.put_nowait(RequestFailedError(o.request_id, o.error))
            else:
                stream.put_nowait(o)

    def _deliver_error(self, request_ids: list[str], error: Exception) -> None:
        for request_id in request_ids:
            stream = self._streams.get(request_id)
            if stream is not None:
                stream.put_nowait(error)

    def _answer_add(self, request_id: str, error: Exception | None) -> None:
        """The stream's first item: None once the engine took the request, else why not."""
        stream = self._streams.get(request_id)
        if stream is not None:  # else the caller was cancelled while waiting
            stream.put_nowait(error)

    def _end_all_streams(self) -> None:
        """The engine's loop is dead: every stream, whatever it waits for, ends with the error."""
        for stream in self._streams.values():
            stream.put_nowait(EngineDeadError(self._death or "the engine stopped"))


class AsyncLLMEngine(EngineFrontend):
    def __init__(self, engine: LLMEngine, max_queued_requests: int = 64, retry_after_s: float = 1.0,
                 request_timeout_s: float | None = None) -> None:
        """The engine's loop in a thread of this process (EngineFrontend says what the limits do)."""
        super().__init__(engine.scheduler.config.max_num_seqs, max_queued_requests, retry_after_s,
                         request_timeout_s)
        self.engine = engine
        self._commands: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._thread = threading.Thread(target=self._run, name="nextserve-engine", daemon=True)
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def healthy(self) -> bool:
        """Whether requests can run: the engine thread lives, is not stopping, and the executor
        says it is healthy."""
        if self._stopped or self._death is not None or not self._thread.is_alive():
            return False
        try:
            return bool(getattr(self.engine.executor, "healthy", lambda: True)())
        except Exception:
            log.exception("executor health check failed")
            return False

    def stats(self) -> EngineStats:
        # Read across threads without a lock: plain counters and queue lengths, a snapshot.
        return self.engine.stats

    def shutdown(self, timeout_s: float = 10.0) -> None:
        self._stopped = True
        self._wakeup.set()
        self._thread.join(timeout_s)
        self.engine.executor.shutdown()

    # -- the engine thread -------------------------------------------------------------------
    def _send(self, *command: Any) -> None:
        self._commands.put(command)
        self._wakeup.set()

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # whatever ends the thread must reach every caller
            log.critical("the engine thread died", exc_info=e)
            self._death = f"the engine stopped: {type(e).__name__}: {e}"
            self._post(self._end_all_streams)

    def _serve(self) -> None:
        while not self._stopped:
            self._drain_commands()
            if not self.engine.has_unfinished():
                executor = self.engine.executor
                if not self._wakeup.wait(executor.idle_after_s) and not self._stopped:
                    self._idle(executor)
                    self._wakeup.wait()
                self._wakeup.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as e:  # one bad step must not take the replica down
                log.exception("engine step failed")
                self._fail_all(EngineStepError(f"engine step failed: {e}"))
                continue
            if outputs:
                self._post(self._deliver, outputs)

    def _idle(self, executor: Any) -> None:
        try:
            executor.idle()
        except Exception:  # the next step finds out what is wrong and says so
            log.exception("executor idle hook failed")

    def _drain_commands(self) -> None:
        while True:
            try:
                kind, request_id, *rest = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "abort":
                self.engine.abort_request(request_id)
                continue
            prompt, params = rest
            try:
                self.engine.add_request(request_id, prompt, params)
            except Exception as e:  # ValueError for bad input; anything else is ours
                self._post(self._answer_add, request_id, e)
            else:
                self._post(self._answer_add, request_id, None)

    def _fail_all(self, error: Exception) -> None:
        ids = self.engine.unfinished_request_ids()
        for request_id in ids:
            self.engine.abort_request(request_id)
        self._post(self._deliver_error, ids, error)

    def _post(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

def merge_outputs(a: RequestOutput, b: RequestOutput) -> RequestOutput:
    """One request's two consecutive outputs as one, as if one step had produced both."""

    def cat(x: tuple | None, y: tuple | None) -> tuple | None:
        return None if x is None and y is None else (x or ()) + (y or ())

    return replace(b, new_token_ids=a.new_token_ids + b.new_token_ids,
                   new_logprobs=cat(a.new_logprobs, b.new_logprobs), new_text=a.new_text + b.new_text,
                   new_top_logprobs=cat(a.new_top_logprobs, b.new_top_logprobs),
                   prompt_logprobs=a.prompt_logprobs if a.prompt_logprobs is not None else b.prompt_logprobs,
                   prompt_top_logprobs=a.prompt_top_logprobs if a.prompt_top_logprobs is not None
                   else b.prompt_top_logprobs)

