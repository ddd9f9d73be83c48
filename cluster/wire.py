"""The sockets data plane's transport (cluster/dataplane.py runs the step over it): frames, the
listener every actor opens, authenticated connections, and the inbox its loop reads them into.

A frame is a fixed header, the lengths of its raw buffers, a pickle (protocol 5) of the message
with its numpy arrays taken out of band, then those arrays' bytes as they lie in memory: no copy
into the pickle on the way out (`socket.sendmsg` gathers the pieces), one `recv_into` per array on
the way in, into a fresh writable buffer the array then wraps. bfloat16 tensors already travel as
int16 arrays (cluster/messages.py), so every message is plain numpy + small Python objects.

Same node: a Unix domain socket in a private (0700) temporary directory. Other nodes: TCP on the
node's IP. Either way a connection starts with HELLO carrying the data plane's random token, which
the listener checks with `hmac.compare_digest` before reading anything else from it: no open,
unauthenticated port. The actor's loop thread reads its connections itself (`select`, then whole
frames into per-edge queues) whenever the frame it needs is not there yet, so a frame's arrival
wakes the thread that needs it, once, and a waiting loop burns no CPU; while a send would block
(the receiver's buffer full) the sender reads its own connections, so no two actors sending to
each other can deadlock."""

from __future__ import annotations

import contextlib
import hmac
import os
import pickle
import selectors
import shutil
import socket
import struct
import tempfile
import threading
from collections import defaultdict, deque
from collections.abc import Callable, Iterable
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


def rekeyed(pieces: list[Any], key: Key) -> list[Any]:
    """`encode`'s pieces for another edge: a new header, the same pickle and buffers (one value
    sent on several edges is pickled once)."""
    kind, _, _, step, size, nbuf = HEADER.unpack(pieces[0])
    return [HEADER.pack(kind, key[0], key[1], step, size, nbuf), *pieces[1:]]


def send_frame(sock: socket.socket, kind: int, key: Key, step: int, value: Any,
               inbox: Inbox | None = None) -> None:
    send_all(sock, encode(kind, key, step, value), inbox)


def send_all(sock: socket.socket, pieces: list[Any], inbox: Inbox | None = None) -> None:
    """`sendmsg` until every byte of `pieces` is out (it may send part of them). With `inbox`,
    `sock` is non-blocking: while the receiver's buffer is full this process keeps reading its own
    connections, so two actors sending to each other at once cannot deadlock."""
    views = [memoryview(p).cast("B") for p in pieces if len(memoryview(p).cast("B"))]
    while views:
        try:
            sent = sock.sendmsg(views[:512])  # IOV_MAX is 1024 on Linux
        except BlockingIOError:
            assert inbox is not None
            inbox.pump(writable=sock)
            if inbox.stopped:
                raise DataPlaneStoppedError() from None
            continue
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


class _Reader:
    """The frames of one non-blocking connection, assembled from whatever bytes have arrived:
    header, buffer lengths, pickle, then each raw buffer, each read straight into its own
    bytearray."""

    def __init__(self, sock: socket.socket, sender: int) -> None:
        self.sock, self.sender = sock, sender
        self._reset()

    def _reset(self) -> None:
        self.stage, self.buf, self.got = "header", bytearray(HEADER.size), 0
        self.header: tuple[int, ...] = ()
        self.lengths: tuple[int, ...] = ()
        self.data = bytearray()
        self.buffers: list[bytearray] = []

    def _piece(self, stage: str, size: int) -> None:
        self.stage, self.buf, self.got = stage, bytearray(size), 0

    def _next_buffer(self) -> None:
        if len(self.buffers) < len(self.lengths):
            self._piece("buffer", self.lengths[len(self.buffers)])
        else:
            self.stage = "done"

    def read(self) -> list[Frame]:
        """Frames completed by the bytes available now; EOFError when the peer closed."""
        frames = []
        while True:
            if self.got < len(self.buf):
                try:
                    k = self.sock.recv_into(memoryview(self.buf)[self.got:])
                except BlockingIOError:
                    return frames
                if k == 0:
                    raise EOFError("connection closed")
                self.got += k
                continue
            if self.stage == "header":  # the current piece is complete: on to the next
                self.header = HEADER.unpack(self.buf)
                self._piece("lengths", 8 * self.header[5])
            elif self.stage == "lengths":
                self.lengths = struct.unpack(f"<{self.header[5]}Q", self.buf)
                self._piece("data", self.header[4])
            elif self.stage == "data":
                self.data = self.buf
                self._next_buffer()
            else:
                self.buffers.append(self.buf)
                self._next_buffer()
            if self.stage == "done":
                kind, node, out, step, _, _ = self.header
                frames.append(Frame(kind, (node, out), step, pickle.loads(self.data, buffers=self.buffers)))
                self._reset()


class Inbox:
    """Per-edge FIFO queues of received frames, filled and emptied by the one thread that waits on
    them (an actor's loop): when the frame it needs is not there yet it blocks in `select` on its
    connections and reads whatever arrives, so the wake-up that brings a frame is the loop's own
    (no hand-off between threads). Frames of a step the loop finished or the driver aborted are
    discarded. `stop` may come from another thread."""

    def __init__(self, on_eof: Callable[[int], None] | None = None) -> None:
        self.queues: dict[Key, deque[Frame]] = defaultdict(deque)
        self.aborted = -1  # the highest step the driver aborted
        self.stopped = False
        self.on_eof = on_eof
        self.selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    def add(self, conn: socket.socket, sender: int) -> None:
        """Read `conn` (an accepted connection from `sender`) from now on; it becomes non-blocking
        (replies sent on it pass this inbox to `send_frame`)."""
        conn.setblocking(False)
        self.selector.register(conn, selectors.EVENT_READ, _Reader(conn, sender))

    def put(self, frame: Frame) -> None:
        if frame.kind == ABORT:
            self.aborted = max(self.aborted, frame.step)
        elif frame.step > self.aborted:
            self.queues[frame.key].append(frame)

    def stop(self) -> None:
        self.stopped = True
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def close(self) -> None:
        self.stop()
        self.selector.close()
        self._wake_r.close()
        self._wake_w.close()

    def pump(self, writable: socket.socket | None = None) -> bool:
        """Block until a connection has data (or `writable` can take more, or `stop`) and read what
        each has, completing frames as their bytes arrive (never waiting for the rest of one: its
        sender may itself be waiting to send to us). Returns whether `writable` is ready."""
        if writable is not None:
            self.selector.register(writable, selectors.EVENT_WRITE, "w")
        try:
            events = self.selector.select()
        finally:
            if writable is not None:
                self.selector.unregister(writable)
        ready = False
        for key, _ in events:
            if key.data == "w":
                ready = True
            elif key.data is None:
                with contextlib.suppress(OSError):
                    self._wake_r.recv(64)
            else:
                reader: _Reader = key.data
                try:
                    for frame in reader.read():
                        self.put(frame)
                except (EOFError, OSError, pickle.UnpicklingError, struct.error):
                    self.selector.unregister(reader.sock)
                    reader.sock.close()
                    if self.on_eof is not None:
                        self.on_eof(reader.sender)
        return ready

    def get(self, key: Key, step: int | None, done: int) -> Frame | None:
        """The next frame of edge `key` for `step` (None: whichever step comes next, above `done`).
        Returns None when `step` was aborted (or a later step's frame shows it was left behind);
        raises DataPlaneStoppedError when the plane stops. Blocks without spinning."""
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
            self.pump()


class Listener:
    """A Unix socket (and, with `tcp_host`, a TCP port) that takes authenticated connections and
    hands each to `inbox`, which its owner's loop reads."""

    def __init__(self, token: bytes, inbox: Inbox, tcp_host: str | None) -> None:
        self.token, self.inbox = token, inbox
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
            threading.Thread(target=self._hello, args=(conn,), daemon=True, name="dataplane-hello").start()

    def _hello(self, conn: socket.socket) -> None:
        """Read the HELLO (a fixed size, so a stranger cannot make us read more) and check the
        token before the connection is used; else close it."""
        try:
            conn.settimeout(10.0)  # a peer that connects and says nothing is not waited on forever
            magic, sender, token = HELLO.unpack(_recv_exact(conn, HELLO.size))
            conn.settimeout(None)
        except (EOFError, OSError, struct.error):
            conn.close()
            return
        if magic != MAGIC or not hmac.compare_digest(token, self.token):
            conn.close()
            return
        if conn.family == socket.AF_INET:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            if self._closed or sender in self.senders:
                conn.close()
                return
            self.conns.append(conn)
            self.senders[sender] = conn
            self._joined.notify_all()

    def wait_senders(self, senders: Iterable[int], timeout_s: float) -> None:
        """Wait until every one of `senders` has connected, and give their connections to the inbox
        (before its loop starts reading)."""
        want = set(senders)
        with self._joined:
            if not self._joined.wait_for(lambda: want <= set(self.senders) or self._closed, timeout_s) \
                    or self._closed:
                missing = sorted(want - set(self.senders))
                raise ConnectionError(f"data plane: senders {missing} did not connect within {timeout_s}s")
            for sender in sorted(want):
                self.inbox.add(self.senders[sender], sender)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            for s in (*self.socks, *self.conns):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()
        shutil.rmtree(self.dir, ignore_errors=True)
