"""The sockets data plane's transport (cluster/dataplane.py runs the step over it): frames, the
listener every actor opens, authenticated connections, and the inbox its loop reads them into.

A frame is a fixed header, then its body: the lengths of its raw buffers, a pickle (protocol 5)
of the message with its numpy arrays taken out of band, then those arrays' bytes as they lie in
memory, each at a multiple of 16 bytes into the body (so every array is aligned): no copy into the
pickle on the way out (`socket.sendmsg` gathers the pieces), and on the way in one `recv_into`
for the header and one for the whole body, a fresh writable buffer the arrays then wrap (a
`recv_into` per piece cost ~4 more system calls per edge). bfloat16 tensors already travel as
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

# kind, edge (node id, output index; lane inputs: node -1), step, pickle bytes, buffers, body bytes
HEADER = struct.Struct("<BxxxiiqIIQ")
ALIGN = 16  # a raw buffer's offset in the body: numpy wants its itemsize, SIMD loads like more
_ZEROS = bytes(ALIGN)
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
    """The pieces of one frame, for `socket.sendmsg`: header, buffer lengths, pickle, raw buffers
    (each after the zeros that align it)."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    raws = [b.raw() for b in buffers]
    lengths = struct.pack(f"<{len(raws)}Q", *(r.nbytes for r in raws))
    pieces: list[Any] = [b"", lengths, data]
    size = len(lengths) + len(data)
    for r in raws:
        pad = -size % ALIGN
        if pad:
            pieces.append(_ZEROS[:pad])
        pieces.append(r)
        size += pad + r.nbytes
    pieces[0] = HEADER.pack(kind, key[0], key[1], step, len(data), len(raws), size)
    return pieces


def rekeyed(pieces: list[Any], key: Key) -> list[Any]:
    """`encode`'s pieces for another edge: a new header, the same pickle and buffers (one value
    sent on several edges is pickled once)."""
    kind, _, _, step, size, nbuf, body = HEADER.unpack(pieces[0])
    return [HEADER.pack(kind, key[0], key[1], step, size, nbuf, body), *pieces[1:]]


def decode(header: tuple[int, ...], body: bytearray) -> Frame:
    """The frame of an unpacked `header` and its `body`; the arrays wrap slices of `body`."""
    kind, node, out, step, size, nbuf, total = header
    if len(body) != total:
        raise struct.error(f"a frame body of {len(body)} bytes, its header says {total}")
    lengths = struct.unpack_from(f"<{nbuf}Q", body, 0) if nbuf else ()
    view = memoryview(body)
    at = 8 * nbuf
    data = view[at:at + size]
    at += size
    buffers = []
    for n in lengths:
        at += -at % ALIGN
        if at + n > total:
            raise struct.error("a frame's buffers run past its body")
        buffers.append(view[at:at + n])
        at += n
    return Frame(kind, (node, out), step, pickle.loads(data, buffers=buffers))


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
    header = HEADER.unpack(_recv_exact(sock, HEADER.size))
    return decode(header, _recv_exact(sock, header[6]))


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
    the header, then the whole body, each read straight into its own bytearray."""

    def __init__(self, sock: socket.socket, sender: int) -> None:
        self.sock, self.sender = sock, sender
        self._reset()

    def _reset(self) -> None:
        self.header: tuple[int, ...] | None = None
        self.buf, self.got = bytearray(HEADER.size), 0

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
            if self.header is None:  # the header is complete: on to the body
                self.header = HEADER.unpack(self.buf)
                self.buf, self.got = bytearray(self.header[6]), 0
            else:
                frames.append(decode(self.header, self.buf))
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
