"""The step graph over sockets (`cluster.data_plane: sockets`, the default): every actor runs a
loop thread that executes its static share of the step graph and passes messages to the actors
that consume them over blocking sockets (cluster/wire.py), so a waiting actor burns no CPU and
wakes as soon as its input arrives; Ray only starts and stops it.

The per-actor programs come from the same wiring as the compiled graph and the remote calls
(`wire_lanes` in cluster/step_graph.py), with a binder that records the calls: each actor runs its
calls in the order they were wired (a topological order, lanes interleaved), and for each receives
its inputs, calls the actor's `run`/`finish`, and sends every output to the actor that consumes it
(an output it consumes itself stays in the process). The driver sends each step's StepMsg once to
every mixer and receives the StepResults from the last mixer on one control connection per actor,
which also carries an actor's exception (its text) to the driver and tells it at once when the
actor dies (EOF: PeerLostError, which the executor's recovery handles). Frames carry the step's
number, so after a failed step (the driver aborts it on every actor) nothing of it is used later."""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import ray

from cluster.messages import StepMsg, StepResult
from cluster.placement import ClusterPlacement
from cluster.step_graph import wire_lanes
from cluster.wire import (
    ABORT,
    DATA,
    ERROR,
    Address,
    DataPlaneStoppedError,
    Frame,
    Inbox,
    Listener,
    PeerLostError,
    connect,
    encode,
    new_token,
    recv_frame,
    rekeyed,
    send_all,
    send_frame,
)
from model.config import ModelConfig

log = logging.getLogger(__name__)
DRIVER = -1  # sender / destination id of the driver; actors are 0.. (mixers, then shards)
STOP_S = 10.0  # how long stopping waits for an actor's loop to leave its current call


class DataPlaneActorError(RuntimeError):
    """An actor's call raised during a step; the message names the actor and carries its error."""


@dataclass(frozen=True)
class Ref:
    """Output `out` of call `node` of a step; node -1: the driver's StepMsg of lane `out`."""

    node: int
    out: int


@dataclass(frozen=True)
class Op:
    node: int
    actor: int
    method: str
    num_returns: int
    args: tuple[Any, ...]  # Ref or a constant (a layer index, None)


@dataclass(frozen=True)
class Program:
    """One actor's share of a step: its calls in order, and where each of its outputs goes."""

    actor: int
    name: str
    ops: tuple[Op, ...]
    sends: dict[Ref, tuple[int, ...]]  # output -> other actors (or DRIVER) that consume it
    receives_from: tuple[int, ...]  # the actors (and DRIVER) that send to this one


def record(model: ModelConfig, placement: ClusterPlacement, num_lanes: int,
           ) -> tuple[list[Op], list[Ref]]:
    """The step graph's calls, in wiring order, and each lane's result (a `finish` output)."""
    ops: list[Op] = []
    M = len(placement.mixers)

    def call(actor: int, method: str, num_returns: int, *args: Any) -> Any:
        node = len(ops)
        ops.append(Op(node, actor, method, num_returns, args))
        return [Ref(node, k) for k in range(num_returns)] if num_returns > 1 else Ref(node, 0)

    lanes = [Ref(-1, i) for i in range(num_lanes)]
    shards = list(range(M, M + placement.num_shards))
    results = wire_lanes(call, lanes, model, placement, list(range(M)), shards)
    return ops, results


def programs(ops: Sequence[Op], results: Sequence[Ref], names: Sequence[str]) -> list[Program]:
    producer = {op.node: op.actor for op in ops}
    consumers: dict[Ref, set[int]] = {r: {DRIVER} for r in results}
    for op in ops:
        for a in op.args:
            if isinstance(a, Ref) and a.node >= 0 and producer[a.node] != op.actor:
                consumers.setdefault(a, set()).add(op.actor)
    out = []
    for i, name in enumerate(names):
        mine = tuple(op for op in ops if op.actor == i)
        sends = {r: tuple(sorted(c)) for r, c in consumers.items() if producer[r.node] == i}
        senders = {DRIVER} | {producer[r.node] for r, c in consumers.items() if i in c}
        out.append(Program(i, name, mine, sends, tuple(sorted(senders))))
    return out


class ActorPlane:
    """An actor's end of the data plane: its listener, connections to the actors it sends to, and
    the loop thread that runs its Program over `worker` (a MixerWorker or ExpertWorker)."""

    def __init__(self, worker: Any, token: bytes, tcp_host: str | None) -> None:
        self.worker, self.token = worker, token
        self.inbox = Inbox(on_eof=self._on_eof)
        self.listener = Listener(token, self.inbox, tcp_host)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.address = Address(self.node_id, self.listener.path, self.listener.tcp)
        self.peers: dict[int, socket.socket] = {}
        self.thread: threading.Thread | None = None

    def _on_eof(self, sender: int) -> None:
        if sender == DRIVER:  # the driver is gone or tore the plane down: nothing more will come
            self.inbox.stop()

    def start(self, program: Program, addresses: dict[int, Address], timeout_s: float) -> None:
        self.program = program
        dests = {d for ds in program.sends.values() for d in ds if d != DRIVER}
        for d in sorted(dests):
            self.peers[d] = connect(addresses[d], self.node_id, self.token, program.actor, timeout_s)
            self.peers[d].setblocking(False)  # a send reads the inbox while the peer's buffer is full
        self.listener.wait_senders(program.receives_from, timeout_s)
        self.peers[DRIVER] = self.listener.senders[DRIVER]  # results and errors go back on it
        self.thread = threading.Thread(target=self._loop, daemon=True, name="dataplane-loop")
        self.thread.start()

    def stop(self) -> None:
        self.inbox.stop()
        if self.thread is not None:
            self.thread.join(STOP_S)
        self.listener.close()
        for d, s in self.peers.items():
            if d != DRIVER:
                s.close()
        if self.thread is None or not self.thread.is_alive():
            self.inbox.close()

    def _loop(self) -> None:
        done = -1  # the last step this actor finished or abandoned
        while True:
            step: int | None = None
            try:
                step = self._run_step(done)
            except DataPlaneStoppedError:
                return
            except _AbandonedError as a:
                step = a.step
            except Exception as e:  # the call failed (or a send did): the driver hears why
                step = getattr(e, "dataplane_step", None)
                lost = isinstance(e, OSError)
                text = f"{self.program.name}: {type(e).__name__}: {e}"
                if not lost:
                    text += "\n" + "".join(traceback.format_exception(e)[-6:])
                try:
                    send_frame(self.peers[DRIVER], ERROR, (0, 0), -1 if step is None else step, (lost, text),
                               self.inbox)
                except (OSError, DataPlaneStoppedError):
                    return  # the driver is gone too
            if step is not None:
                done = max(done, step)

    def _run_step(self, done: int) -> int:
        local: dict[Ref, Any] = {}
        step: int | None = None
        try:
            for op in self.program.ops:
                args = []
                for a in op.args:
                    if not isinstance(a, Ref):
                        args.append(a)
                        continue
                    if a not in local:
                        f = self.inbox.get((a.node, a.out), step, done)
                        if f is None:
                            raise _AbandonedError(step)
                        step = f.step
                        local[a] = f.value
                    args.append(local[a])
                out = getattr(self.worker, op.method)(*args)
                outs = out if op.num_returns > 1 else (out,)
                encoded: dict[int, list[Any]] = {}  # id(output) -> its pieces: a value returned on
                for k, v in enumerate(outs):        # several edges (all-rows dispatch) pickles once
                    r = Ref(op.node, k)
                    local[r] = v
                    dests = self.program.sends.get(r, ())
                    if dests:
                        if id(v) in encoded:
                            pieces = rekeyed(encoded[id(v)], (r.node, r.out))
                        else:
                            pieces = encoded[id(v)] = encode(DATA, (r.node, r.out), step, v)
                        for d in dests:  # once for every consumer
                            send_all(self.peers[d], pieces, self.inbox)
        except Exception as e:
            e.dataplane_step = step  # type: ignore[attr-defined]
            raise
        assert step is not None  # every program reads at least one input
        return step


class _AbandonedError(Exception):
    def __init__(self, step: int | None) -> None:
        super().__init__(step)
        self.step = step


# -- called in the actors through __ray_call__ (the worker classes stay as they are) ----------
def _node_info(worker: Any) -> tuple[str, str]:
    return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address()


def _open(worker: Any, token: bytes, tcp_host: str | None) -> Address:
    _stop(worker)
    worker.data_plane = ActorPlane(worker, token, tcp_host)
    return worker.data_plane.address


def _start(worker: Any, program: Program, addresses: dict[int, Address], timeout_s: float) -> bool:
    worker.data_plane.start(program, addresses, timeout_s)
    return True


def _stop(worker: Any) -> bool:
    """Stop the actor's loop; False if it is still inside a call after STOP_S."""
    plane = getattr(worker, "data_plane", None)
    if plane is not None:
        plane.stop()
        worker.data_plane = None
        return plane.thread is None or not plane.thread.is_alive()
    return True


class SocketStep:
    """The step over the sockets data plane for `num_lanes` lanes (each step sends every lane,
    an empty one as StepMsg(step=None)); built on the executor's actors, torn down before they
    take plain calls again."""

    def __init__(self, model: ModelConfig, placement: ClusterPlacement, mixers: Sequence[Any],
                 shards: Sequence[Any], num_lanes: int, timeout_s: float, names: Sequence[str]) -> None:
        self.timeout_s, self.num_lanes = timeout_s, num_lanes
        self.actors, self.names = [*mixers, *shards], list(names)
        ops, self.results = record(model, placement, num_lanes)
        progs = programs(ops, self.results, self.names)
        # which actors read each lane's StepMsg (every mixer: the layout, the state copies)
        self.lane_readers = [sorted({op.actor for op in ops if Ref(-1, i) in op.args})
                             for i in range(num_lanes)]
        self.token = new_token()
        self.conns: dict[int, socket.socket] = {}
        self.replies: queue.Queue[tuple[int, Frame | None]] = queue.Queue()
        self.steps = itertools.count()
        self._closed = False
        infos = ray.get([a.__ray_call__.remote(_node_info) for a in self.actors], timeout=timeout_s)
        my_node = ray.get_runtime_context().get_node_id()
        spread = len({n for n, _ in infos} | {my_node}) > 1  # TCP only where a peer is on another node
        addresses = dict(enumerate(ray.get(
            [a.__ray_call__.remote(_open, self.token, ip if spread else None)
             for a, (_, ip) in zip(self.actors, infos, strict=True)], timeout=timeout_s)))
        try:
            for i, address in addresses.items():
                self.conns[i] = connect(address, my_node, self.token, DRIVER, timeout_s)
                threading.Thread(target=self._read, args=(i,), daemon=True, name="dataplane-driver").start()
            ray.get([a.__ray_call__.remote(_start, p, addresses, timeout_s)
                     for a, p in zip(self.actors, progs, strict=True)], timeout=timeout_s)
        except BaseException:
            self.teardown()
            raise

    def _read(self, i: int) -> None:
        conn = self.conns[i]
        try:
            while True:
                self.replies.put((i, recv_frame(conn)))
        except (EOFError, OSError):
            self.replies.put((i, None))

    def __call__(self, msgs: Sequence[StepMsg]) -> list[StepResult | None]:
        if len(msgs) != self.num_lanes:
            raise ValueError(f"the step has {self.num_lanes} lanes, got {len(msgs)} messages")
        if self._closed:
            raise PeerLostError("the data plane was torn down")
        step = next(self.steps)
        try:
            for lane, (msg, readers) in enumerate(zip(msgs, self.lane_readers, strict=True)):
                pieces = encode(DATA, (-1, lane), step, msg)  # pickled once for every mixer
                for i in readers:
                    send_all(self.conns[i], pieces)
        except OSError as e:
            raise PeerLostError(f"data plane: sending the step to {self.names[i]} failed ({e})") from None
        want = {(r.node, r.out): lane for lane, r in enumerate(self.results)}
        out: list[StepResult | None] = [None] * self.num_lanes
        deadline = time.monotonic() + self.timeout_s
        while want:
            try:
                i, frame = self.replies.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self._abort(step)
                raise ray.exceptions.GetTimeoutError(
                    f"data plane: step {step} not done within {self.timeout_s}s "
                    f"(cluster.step_timeout_s)") from None
            if frame is None:
                self._closed = True
                raise PeerLostError(f"data plane: {self.names[i]} closed its connection (the actor or "
                                    f"its node died)")
            if frame.step != step:
                continue  # an aborted step's late answer
            if frame.kind == ERROR:
                self._abort(step)
                lost, text = frame.value
                raise (PeerLostError if lost else DataPlaneActorError)(f"data plane, actor {text}")
            lane = want.pop(frame.key, None)
            if lane is not None:
                out[lane] = frame.value
        return out

    def _abort(self, step: int) -> None:
        """Every actor drops what it holds of `step` and waits for the next."""
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                send_frame(conn, ABORT, (0, 0), step, None)

    def teardown(self, kill_actors: bool = False) -> None:
        """Close the control connections (each actor's loop then stops by itself) and wait until the
        loops have left, so the actors take plain calls again; `kill_actors`: kill them instead."""
        self._closed = True
        for conn in self.conns.values():
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()
        if kill_actors:
            for a in self.actors:
                try:
                    ray.kill(a, no_restart=True)
                except Exception as e:  # already gone
                    log.debug("kill: %s", e)
            return
        refs = [a.__ray_call__.remote(_stop) for a in self.actors]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=STOP_S + 5)
        for actor, ref in zip(self.actors, refs, strict=True):
            stopped = False
            if ref in ready:
                try:
                    stopped = ray.get(ref, timeout=1)
                except Exception as e:  # a dead actor: its loop is gone with it
                    log.debug("data plane stop: %s", e)
                    continue
            if not stopped:
                # Its loop is stuck in a call: a plane built next must not run beside it on the
                # same caches, so the actor goes, and the executor's recovery restarts it.
                log.warning("data plane: an actor's loop did not stop within %.0fs; killing it", STOP_S)
                with contextlib.suppress(Exception):
                    ray.kill(actor, no_restart=True)
