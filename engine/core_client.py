"""The replica's side of an engine core in its own process (engine/core.py): the same face as
AsyncLLMEngine (generate, stats, healthy, is_alive, shutdown, num_in_flight; the same errors),
so the routes cannot tell the two apart. It starts the core with multiprocessing's spawn context
(torch, threads and fork do not mix), sends each add and abort down a pipe, and a reader thread
turns each CoreStep message into the streams' outputs, once per step. If the core process ends
unasked (killed, crashed), the reader sees the pipe close: every stream ends with
EngineDeadError, new requests get it at once and `healthy()` turns False."""

from __future__ import annotations

import logging
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.async_engine import EngineDeadError, EngineFrontend, EngineStepError
from engine.core import (
    AbortRequest,
    AddRequest,
    CoreFailed,
    CoreReady,
    CoreStep,
    Shutdown,
    from_row,
    run_core,
)
from engine.llm_engine import EngineStats, LLMEngine, StepHook

log = logging.getLogger(__name__)


class EngineCoreClient(EngineFrontend):
    def __init__(self, build: Callable[[], LLMEngine], max_queued_requests: int = 64,
                 retry_after_s: float = 1.0, request_timeout_s: float | None = None,
                 startup_timeout_s: float = 600.0) -> None:
        """Start a core process that calls `build` (picklable: a module-level function or a
        partial of one) and wait until its engine is built. Whatever `build` raises is raised
        here, the same exception where it pickles; the process is gone by then."""
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        self._process = ctx.Process(target=run_core, args=(build, child), name="nextserve-engine-core",
                                    daemon=True)
        self._process.start()
        child.close()  # the core holds the only other end: its death closes the pipe
        self._send_lock = threading.Lock()
        try:
            ready = self._wait_ready(startup_timeout_s)
        except BaseException:
            self._stop_process(5.0)
            raise
        super().__init__(ready.max_num_seqs, max_queued_requests, retry_after_s, request_timeout_s)
        self.model_config = ready.model_config
        self.max_seq_len = ready.max_seq_len
        self.pid = ready.pid
        self._stats = ready.stats
        # Called with (stats, step seconds, per-expert counts) after each of the core's steps,
        # from the reader thread, as LLMEngine.step_hooks are from the engine thread.
        self.step_hooks: list[StepHook] = []
        self._reader = threading.Thread(target=self._read, name="nextserve-core-reader", daemon=True)
        self._reader.start()

    def _wait_ready(self, timeout_s: float) -> CoreReady:
        deadline = time.monotonic() + timeout_s
        while not self._conn.poll(0.1):
            if not self._process.is_alive():
                raise RuntimeError(f"the engine core process exited during start-up "
                                   f"(exit code {self._process.exitcode})")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the engine core did not start within {timeout_s:g}s")
        try:
            msg = self._conn.recv()
        except EOFError:
            self._process.join(5.0)
            raise RuntimeError(f"the engine core process exited during start-up "
                               f"(exit code {self._process.exitcode})") from None
        if isinstance(msg, CoreFailed):
            raise msg.error
        if not isinstance(msg, CoreReady):
            raise RuntimeError(f"the engine core said {type(msg).__name__} before it was ready")
        return msg

    # -- the engine's face --------------------------------------------------------------------
    def is_alive(self) -> bool:
        return self._process.is_alive()

    def healthy(self) -> bool:
        return (not self._stopped and self._death is None and self._process.is_alive()
                and self._reader.is_alive())

    def stats(self) -> EngineStats:
        return self._stats

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Ask the core to stop, and make sure it has: no core outlives its replica."""
        if self._stopped:
            return
        self._stopped = True
        try:
            with self._send_lock:
                self._conn.send(Shutdown())
        except OSError:  # it is gone already
            pass
        self._stop_process(timeout_s)

    def _stop_process(self, timeout_s: float) -> None:
        self._process.join(timeout_s)
        if self._process.is_alive():
            log.warning("the engine core did not stop within %gs; killing it", timeout_s)
            self._process.kill()
            self._process.join(5.0)
        self._conn.close()

    def _send(self, kind: str, request_id: str, *rest: Any) -> None:
        msg = AddRequest(request_id, *rest) if kind == "add" else AbortRequest(request_id)
        try:
            with self._send_lock:
                self._conn.send(msg)
        except OSError as e:  # the core is gone; the reader ends every stream and says why
            if kind == "add":
                raise EngineDeadError(self._death or f"the engine core is gone: {e}") from None

    # -- the reader thread ---------------------------------------------------------------------
    def _read(self) -> None:
        reason = "the engine core process exited"
        try:
            while True:
                msg = self._conn.recv()
                if isinstance(msg, CoreStep):
                    self._on_step(msg)
                elif isinstance(msg, CoreFailed):
                    reason = f"the engine stopped: {type(msg.error).__name__}: {msg.error}"
        except (EOFError, OSError):
            pass
        except BaseException as e:
            log.critical("the engine core reader died", exc_info=e)
            reason = f"the engine core reader stopped: {type(e).__name__}: {e}"
        if self._stopped:
            return
        self._process.join(1.0)
        self._death = f"{reason} (exit code {self._process.exitcode})"
        log.critical("%s; this replica can run no more requests", self._death)
        self._post(self._end_all_streams)

    def _on_step(self, msg: CoreStep) -> None:
        self._stats = msg.stats
        if msg.step_seconds is not None:
            for hook in self.step_hooks:
                try:
                    hook(msg.stats, msg.step_seconds, msg.expert_counts or {})
                except Exception:  # metrics must not stop the streams
                    log.exception("a step hook failed")
        self._post(self._deliver_step, msg)

    def _post(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    # -- back on the event loop ----------------------------------------------------------------
    def _deliver_step(self, msg: CoreStep) -> None:
        for request_id in msg.accepted:
            self._answer_add(request_id, None)
        for request_id, error in msg.refused:
            self._answer_add(request_id, error)
        if msg.outputs:
            self._deliver([from_row(row) for row in msg.outputs])
        if msg.failed is not None:
            ids, message = msg.failed
            self._deliver_error(list(ids), EngineStepError(message))
