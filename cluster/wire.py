"""The sockets data plane's transport (cluster/dataplane.py runs the step over it): frames, the
listener every actor opens, authenticated connections, and the inbox its receiver threads fill.

A frame is a fixed header, the lengths of its raw buffers, a pickle (protocol 5) of the message
with its numpy arrays taken out of band, then those arrays' bytes as they lie in memory: no copy
into the pickle on the way out (`socket.sendmsg` gathers the pieces), one `recv_into` per array on
the way in, into a fresh writable buffer the array then wraps. bfloat16 tensors already travel as
int16 arrays (cluster/messages.py), so every message is plain numpy + small Python objects.

Same node: a Unix domain socket in a private (0700) temporary directory. Other nodes: TCP on the
node's IP. Either way a connection starts with HELLO carrying the data plane's random token, which
the listener checks with `hmac.compare_digest` before reading anything else from it: no open,
unauthenticated port. Every accepted connection gets a reader thread that reads its frames into
per-edge queues, so a sender never waits on a full socket buffer, and a reader blocked in `recv`
burns no CPU and wakes as soon as bytes arrive."""

from __future__ import annotations

import contextlib
import hmac
import os
import pickle
import shutil
import socket
import struct
import tempfile
import threading
from collections import defaultdict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# kind, edge (node id, output index; lane inputs: node -1), step, pickle bytes, buffers
HEADER = struct.Struct("<BxxxiiqII")
DATA, ERROR, ABORT = 1, 2, 3
TOKEN_BYTES = 32
# The first bytes on a connection, read whole before anything else: magic, sender id, token.
HELLO = struct.Struct(f"<4si{TOKEN_BYTES}s")
MAGIC = b"NSDP"
Key = tuple[int, int]


class PeerLostError(ConnectionError):
    """A data-plane connection ended (its process died or its node went away) while a step needed
    it. One of cluster/recovery.py's ACTOR_FAILURES: the executor restarts the dead actors."""


class DataPlaneStoppedError(Exception):
    """The data plane of this process was stopped while its loop waited."""


@dataclass(frozen=True)
class Frame:
    kind: int
    key: Key
    step: int
    value: Any


def encode(kind: int, key: Key, step: int, value: Any) -> list[Any]:
    """The pieces of one frame, for `socket.sendmsg`: header, buffer lengths, pickle, raw buffers."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    lengths = struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    return [HEADER.pack(kind, key[0], key[1], step, len(data), len(raws)), lengths, data, *raws]


def send_frame(sock: socket.socket, kind: int, key: Key, step: int, value: Any) -> None:
    send_all(sock, encode(kind, key, step, value))


def send_all(sock: socket.socket, pieces: list[Any]) -> None:
    """`sendmsg` until every byte of `pieces` is out (it may send part of them)."""
    views = [memoryview(p).cast("B") for p in pieces if len(memoryview(p).cast("B"))]
    while views:
        sent = sock.sendmsg(views[:512])  # IOV_MAX is 1024 on Linux
        while sent:
            if sent >= len(views[0]):
                sent -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][sent:]
                sent = 0


def _recv_exact(sock: socket.socket, n: int) -> bytearray:
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            raise EOFError("connection closed")
        got += k
    return buf


def recv_frame(sock: socket.socket) -> Frame:
    """One frame; EOFError when the other end closed (or died)."""
    kind, node, out, step, size, nbuf = HEADER.unpack(_recv_exact(sock, HEADER.size))
    lengths = struct.unpack(f"<{nbuf}Q", _recv_exact(sock, 8 * nbuf)) if nbuf else ()
    data = _recv_exact(sock, size)
    buffers = [_recv_exact(sock, n) for n in lengths]
    return Frame(kind, (node, out), step, pickle.loads(data, buffers=buffers))


def new_token() -> bytes:
    return os.urandom(TOKEN_BYTES)


@dataclass(frozen=True)
class Address:
    """Where a listener takes connections: its node, its Unix socket there, and TCP host:port
    (None: no peer on another node)."""

    node_id: str
    path: str
    tcp: tuple[str, int] | None


def connect(address: Address, my_node_id: str, token: bytes, sender: int, timeout_s: float) -> socket.socket:
    """A blocking connection to `address` (Unix socket on the same node, else TCP), HELLO sent."""
    if address.node_id == my_node_id:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        target: Any = address.path
    else:
        if address.tcp is None:
            raise ConnectionError(f"the data plane at {address.path} takes no TCP connections")
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        target = address.tcp
    sock.settimeout(timeout_s)
    sock.connect(target)
    sock.settimeout(None)
    sock.sendall(HELLO.pack(MAGIC, sender, token))
    return sock


class Inbox:
    """Per-edge FIFO queues of received frames, filled by reader threads, emptied by one loop.
    Frames of a step at or below `dropped` (finished or aborted) are discarded."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.queues: dict[Key, deque[Frame]] = defaultdict(deque)
        self.aborted = -1  # the highest step the driver aborted
        self.stopped = False

    def put(self, frame: Frame) -> None:
        with self.cond:
            if frame.kind == ABORT:
                self.aborted = max(self.aborted, frame.step)
            elif frame.step > self.aborted:
                self.queues[frame.key].append(frame)
            self.cond.notify_all()

    def stop(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()

    def get(self, key: Key, step: int | None, done: int) -> Frame | None:
        """The next frame of edge `key` for `step` (None: whichever step comes next, above `done`).
        Returns None when `step` was aborted (or a later step's frame shows it was left behind);
        raises DataPlaneStoppedError when the plane stops. Blocks without spinning."""
        with self.cond:
            while True:
                if self.stopped:
                    raise DataPlaneStoppedError()
                if step is not None and self.aborted >= step:
                    return None
                q = self.queues.get(key)
                while q and q[0].step <= max(done, self.aborted):
                    q.popleft()  # a frame of a step this process finished or abandoned
                if q:
                    if step is None or q[0].step == step:
                        return q.popleft()
                    if q[0].step > step:
                        return None
                self.cond.wait()


class Listener:
    """A Unix socket (and, with `tcp_host`, a TCP port) that takes authenticated connections and
    reads each one's frames into `inbox` on a thread of its own. `on_eof(sender)` is called when
    a connection ends."""

    def __init__(self, token: bytes, inbox: Inbox, tcp_host: str | None,
                 on_eof: Callable[[int], None] | None = None) -> None:
        self.token, self.inbox, self.on_eof = token, inbox, on_eof
        self.dir = tempfile.mkdtemp(prefix="nextserve-dp-")  # 0700: only this user reaches the socket
        self.path = os.path.join(self.dir, "s")
        self.socks: list[socket.socket] = []
        unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        unix.bind(self.path)
        unix.listen(64)
        self.socks.append(unix)
        self.tcp: tuple[str, int] | None = None
        if tcp_host is not None:
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.bind((tcp_host, 0))
            tcp.listen(64)
            self.tcp = (tcp_host, tcp.getsockname()[1])
            self.socks.append(tcp)
        self.conns: list[socket.socket] = []
        self.senders: dict[int, socket.socket] = {}  # sender id -> its connection (replies go back on it)
        self._lock = threading.Lock()
        self._joined = threading.Condition(self._lock)
        self._closed = False
        self.threads = [threading.Thread(target=self._accept, args=(s,), daemon=True, name="dataplane-accept")
                        for s in self.socks]
        for t in self.threads:
            t.start()

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # closed
            t = threading.Thread(target=self._read, args=(conn,), daemon=True, name="dataplane-read")
            t.start()

    def _read(self, conn: socket.socket) -> None:
        sender = None
        try:
            conn.settimeout(10.0)  # a peer that connects and says nothing is not waited on forever
            magic, who, token = HELLO.unpack(_recv_exact(conn, HELLO.size))
            if magic != MAGIC or not hmac.compare_digest(token, self.token):
                conn.close()
                return
            conn.settimeout(None)
            if conn.family == socket.AF_INET:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sender = who
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self.conns.append(conn)
                self.senders[sender] = conn
                self._joined.notify_all()
            while True:
                self.inbox.put(recv_frame(conn))
        except (EOFError, OSError, pickle.UnpicklingError, struct.error):
            pass
        finally:
            conn.close()
            if sender is not None and self.on_eof is not None and not self._closed:
                self.on_eof(sender)

    def connection_of(self, sender: int, timeout_s: float) -> socket.socket:
        """The connection `sender` opened here (replies to it go back on it), once it is accepted."""
        with self._joined:
            if not self._joined.wait_for(lambda: sender in self.senders or self._closed, timeout_s) \
                    or sender not in self.senders:
                raise ConnectionError(f"data plane: sender {sender} did not connect within {timeout_s}s")
            return self.senders[sender]

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for s in (*self.socks, *self.conns):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        shutil.rmtree(self.dir, ignore_errors=True)
