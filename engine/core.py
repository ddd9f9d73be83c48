"""The engine core in a process of its own (engine/core_client.py starts it): it builds its
LLMEngine from a picklable builder, then runs schedule → execute → sample → process in a busy
loop, blocking on its pipe only while it has no work. Each turn of the loop answers with at most
one CoreStep message that carries everything the turn did for every request, so the cost of the
pipe is paid per step, not per token or per request. Stop strings and output text are settled
here, with the tokens (engine/output_processor.py), so no token past a stop string is computed."""

from __future__ import annotations

import contextlib
import logging
import os
import pickle
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from engine.llm_engine import EngineStats, LLMEngine, RequestOutput
from engine.sampling import SamplingParams
from model.config import ModelConfig

log = logging.getLogger(__name__)

# RequestOutput's fields in order, as one row of a CoreStep (a tuple pickles smaller and faster
# than the dataclass).
OutputRow = tuple[Any, ...]
COMPILE_POLL_S = 1.0  # how often an idle core looks at decode buckets compiling in the background
# A core woken from idle by a request keeps taking the requests that follow it while they come
# at most BURST_GAP_S apart, for at most BURST_WAIT_S, before its first step: clients that send
# together (a burst of 16 or 32) then share one prefill step instead of the first one or two
# running alone while the rest wait behind that step (README "Serving"). A lone request waits
# one gap.
BURST_GAP_S = 0.002
BURST_WAIT_S = 0.010


# -- client → core ----------------------------------------------------------------------------
@dataclass(frozen=True)
class AddRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class Shutdown:
    pass


# -- core → client ----------------------------------------------------------------------------
@dataclass(frozen=True)
class CoreReady:
    """The engine is built; what the client needs to know of it."""

    model_config: ModelConfig
    max_num_seqs: int
    max_seq_len: int
    stats: EngineStats
    pid: int


@dataclass(frozen=True)
class CoreFailed:
    """Building the engine, or the loop, raised `error` (the exception itself where it pickles)."""

    error: BaseException


@dataclass(frozen=True)
class CoreStep:
    """One turn of the core's loop: the requests it took or refused, each request's output of
    the step (OutputRow), the requests a failed step ended and why, the engine's stats after the
    turn, and the step's seconds and per-expert gate counts for the metrics hooks (None when no
    step ran: the turn only took, refused or aborted requests)."""

    stats: EngineStats
    accepted: tuple[str, ...] = ()
    refused: tuple[tuple[str, BaseException], ...] = ()
    outputs: tuple[OutputRow, ...] = ()
    failed: tuple[tuple[str, ...], str] | None = None
    step_seconds: float | None = None
    expert_counts: dict[int, list[int]] | None = None


def to_row(o: RequestOutput) -> OutputRow:
    return (o.request_id, o.new_token_ids, o.new_logprobs, o.finished, o.finish_reason, o.num_prompt_tokens,
            o.num_output_tokens, o.new_text, o.new_top_logprobs, o.prompt_logprobs, o.prompt_top_logprobs,
            o.error, o.num_cached_tokens)


def from_row(row: OutputRow) -> RequestOutput:
    return RequestOutput(*row)


def picklable(error: BaseException) -> BaseException:
    """`error` itself if it survives the pipe, else a RuntimeError with its type and text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:
        return RuntimeError(f"{type(error).__name__}: {error}")


def run_core(build: Callable[[], LLMEngine], conn: Connection) -> None:
    """The core process's entry point: build the engine, say so, serve until told to stop or the
    client's end of the pipe closes (the replica died: nothing is left to serve)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s nextserve-core: %(message)s")
    try:
        engine = build()
    except BaseException as e:
        log.error("the engine core could not start: %s: %s", type(e).__name__, e)
        conn.send(CoreFailed(picklable(e)))
        return
    try:
        EngineCore(engine, conn).run()
    except (EOFError, BrokenPipeError, ConnectionResetError):
        log.info("the client's pipe closed; the engine core exits")
    except BaseException as e:  # the client must hear why, then sees the process end
        log.critical("the engine core died", exc_info=e)
        with contextlib.suppress(Exception):
            conn.send(CoreFailed(picklable(e)))
        raise
    finally:
        engine.executor.shutdown()


class EngineCore:
    def __init__(self, engine: LLMEngine, conn: Connection) -> None:
        self.engine, self.conn = engine, conn
        self._step_info: tuple[EngineStats, float, dict[int, list[int]]] | None = None
        # The metrics hooks run in the client; this one hands them what the step measured.
        engine.step_hooks.append(self._on_step)
        conn.send(CoreReady(model_config=engine.config, max_num_seqs=engine.scheduler.config.max_num_seqs,
                            max_seq_len=engine.scheduler.max_seq_len, stats=engine.stats, pid=os.getpid()))

    def _on_step(self, stats: EngineStats, seconds: float, counts: dict[int, list[int]]) -> None:
        self._step_info = (stats, seconds, counts)

    def run(self) -> None:
        engine, executor = self.engine, self.engine.executor
        while True:
            idle = not engine.has_unfinished()
            if idle:
                self._wait_for_work(executor.idle_after_s)
            accepted, refused, aborted = self._drain()
            if accepted and idle:
                accepted, refused, aborted = self._gather_burst(accepted, refused, aborted)
            if accepted is None:
                return
            outputs: list[RequestOutput] = []
            failed = None
            self._step_info = None
            if engine.has_unfinished():
                try:
                    outputs = engine.step()
                except Exception as e:  # one bad step must not take the core down
                    log.exception("engine step failed")
                    failed = self._fail_all(e)
            if accepted or refused or aborted or outputs or failed or self._step_info:
                stats, seconds, counts = self._step_info or (engine.stats, None, None)
                self.conn.send(CoreStep(stats=stats, accepted=tuple(accepted), refused=tuple(refused),
                                        outputs=tuple(map(to_row, outputs)), failed=failed,
                                        step_seconds=seconds, expert_counts=counts or None))

    def _wait_for_work(self, idle_after_s: float | None) -> None:
        """Block until a command comes, calling the executor's idle hook after `idle_after_s`
        without one; while decode buckets compile in the background, wake every second to send
        the client the stats of each bucket that became ready (its /stats says so without a
        request having to step)."""
        executor = self.engine.executor
        idle_at = None if idle_after_s is None else time.monotonic() + idle_after_s
        compiled = executor.compiled_buckets()
        while True:
            waits = [COMPILE_POLL_S] if compiled[1] else []
            if idle_at is not None:
                waits.append(max(0.0, idle_at - time.monotonic()))
            if self.conn.poll(min(waits) if waits else None):
                return
            if idle_at is not None and time.monotonic() >= idle_at:
                self._idle()
                idle_at = None
            if compiled[1] and (now := executor.compiled_buckets()) != compiled:
                compiled = now
                self.conn.send(CoreStep(stats=self.engine.stats))

    def _gather_burst(self, accepted: list[str], refused: list[tuple[str, BaseException]], aborted: bool,
                      ) -> tuple[list[str] | None, list[tuple[str, BaseException]], bool]:
        """`_drain`'s result extended by the commands that follow within the burst window."""
        end = time.monotonic() + BURST_WAIT_S
        while (left := end - time.monotonic()) > 0 and self.conn.poll(min(BURST_GAP_S, left)):
            more, more_refused, more_aborted = self._drain()
            if more is None:
                return None, [], False
            accepted += more
            refused += more_refused
            aborted |= more_aborted
        return accepted, refused, aborted

    def _drain(self) -> tuple[list[str] | None, list[tuple[str, BaseException]], bool]:
        """Take every waiting command: (requests taken, requests refused, whether one was aborted);
        (None, [], False) once told to shut down."""
        accepted: list[str] = []
        refused: list[tuple[str, BaseException]] = []
        aborted = False
        while self.conn.poll():
            msg = self.conn.recv()
            if isinstance(msg, AbortRequest):
                aborted |= self.engine.abort_request(msg.request_id)
            elif isinstance(msg, AddRequest):
                try:
                    self.engine.add_request(msg.request_id, msg.prompt_token_ids, msg.params)
                    accepted.append(msg.request_id)
                except Exception as e:  # ValueError for bad input; anything else is ours
                    refused.append((msg.request_id, picklable(e)))
            elif isinstance(msg, Shutdown):
                return None, [], False
        return accepted, refused, aborted

    def _fail_all(self, error: Exception) -> tuple[tuple[str, ...], str]:
        ids = self.engine.unfinished_request_ids()
        for request_id in ids:
            self.engine.abort_request(request_id)
        return tuple(ids), f"engine step failed: {error}"

    def _idle(self) -> None:
        try:
            self.engine.executor.idle()
        except Exception:  # the next step finds out what is wrong and says so
            log.exception("executor idle hook failed")
