"""The sockets data plane's transport without Ray: frames round-trip every message kind (bfloat16
as int16, empty lanes), the inbox hands a step's frames in order and drops aborted ones, and a
listener refuses a connection without the plane's token (TCP and Unix)."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
import torch

from cluster.messages import Carry, ShardResult, ShardWork, StepMsg, StepResult, Telemetry, from_wire, to_wire
from cluster.wire import (
    ABORT,
    DATA,
    HELLO,
    MAGIC,
    Address,
    DataPlaneStoppedError,
    Frame,
    Inbox,
    Listener,
    connect,
    encode,
    new_token,
    recv_frame,
    rekeyed,
    send_all,
    send_frame,
)
from engine.executor import StepInput


def roundtrip(value, key=(3, 1), step=7):
    a, b = socket.socketpair()
    try:
        send_frame(a, DATA, key, step, value)
        f = recv_frame(b)
    finally:
        a.close()
        b.close()
    assert (f.kind, f.key, f.step) == (DATA, key, step)
    return f.value


def test_one_value_encoded_once_for_several_edges():
    """All-rows dispatch returns one ShardWork for every shard: pickled once, re-headed per edge."""
    work = ShardWork(4, np.arange(6, dtype=np.float32).reshape(2, 3), np.ones((2, 2), np.int64),
                     np.full((2, 2), 0.5, np.float32))
    pieces = encode(DATA, (9, 1), 5, work)
    again = rekeyed(pieces, (9, 2))
    assert again[1:] == pieces[1:]
    a, b = socket.socketpair()
    try:
        send_all(a, again)
        f = recv_frame(b)
    finally:
        a.close()
        b.close()
    assert (f.kind, f.key, f.step) == (DATA, (9, 2), 5)
    assert f.value.layer == 4 and f.value.x.tolist() == work.x.tolist()
    assert f.value.weights.tolist() == [[0.5] * 2] * 2


def test_received_arrays_are_aligned_in_one_body():
    """Whatever the pickle's length, each array lands at a multiple of 16 bytes: numpy and SIMD
    loads want aligned data, and the arrays of a frame share the one buffer it was read into."""
    for text in ("", "x", "x" * 13):
        value = (text, np.arange(3, dtype=np.int8), np.arange(5, dtype=np.float64),
                 np.ones((2, 3), np.float32))
        got = roundtrip(value)
        assert got[0] == text
        for a, b in zip(got[1:], value[1:], strict=True):
            assert a.ctypes.data % 16 == 0 and a.flags.aligned and a.flags.writeable
            assert a.dtype == b.dtype and a.tolist() == b.tolist()


def test_messages_round_trip_with_their_arrays():
    h = torch.randn(5, 16, dtype=torch.bfloat16)
    carry = Carry(to_wire(h), None, (np.arange(3), np.array([], np.int64)), np.ones((4, 8), np.int32),
                  Telemetry({"deltanet-0": 0.5}, 10, 20))
    got = roundtrip(carry)
    assert got.h.dtype == np.int16 and torch.equal(from_wire(got.h, torch.bfloat16), h)
    assert got.shared is None and [r.tolist() for r in got.rows] == [[0, 1, 2], []]
    assert got.counts.tolist() == carry.counts.tolist() and got.telemetry == carry.telemetry
    got.h[0, 0] = 1  # received arrays are the process's own, writable
    work = ShardWork(2, np.random.rand(0, 16).astype(np.float32), np.zeros((0, 4), np.int64),
                     np.zeros((0, 4), np.float32))  # a shard with no rows this layer
    assert roundtrip(work).x.shape == (0, 16)
    res = roundtrip(ShardResult(np.full((2, 3), 1.5, np.float32), 0.25))
    assert res.partial.tolist() == [[1.5] * 3] * 2 and res.seconds == 0.25
    step = StepInput((5, 6), (0, 1), (0, 0), (1, 1), (0, 1))
    assert roundtrip(StepMsg(4, step, lane=1, want_hidden=True)) == StepMsg(4, step, lane=1, want_hidden=True)
    assert roundtrip(StepMsg(5, None, lane=1)).step is None  # an empty lane
    assert roundtrip(None) is None and roundtrip((None, None, None)) == (None, None, None)
    r = roundtrip(StepResult(np.eye(3, dtype=np.float32), {0: np.arange(4)}, Telemetry(), None))
    assert r.logits.tolist() == np.eye(3).tolist() and r.counts[0].tolist() == [0, 1, 2, 3]


def test_large_arrays_cross_a_full_socket_buffer():
    big = np.random.default_rng(0).standard_normal((512, 1024), dtype=np.float32)  # 2 MiB
    a, b = socket.socketpair()
    out = []
    reader = threading.Thread(target=lambda: out.append(recv_frame(b)))
    reader.start()
    send_frame(a, DATA, (0, 0), 1, (big, big[:, :7].copy()))
    reader.join(10)
    a.close()
    b.close()
    assert np.array_equal(out[0].value[0], big) and np.array_equal(out[0].value[1], big[:, :7])


def test_inbox_hands_a_steps_frames_and_drops_aborted_ones():
    inbox = Inbox()
    inbox.put(Frame(DATA, (1, 0), 3, "a3"))
    inbox.put(Frame(DATA, (1, 0), 4, "a4"))
    assert inbox.get((1, 0), None, done=2).value == "a3"
    inbox.put(Frame(ABORT, (0, 0), 4, None))
    inbox.put(Frame(DATA, (1, 0), 4, "late a4"))  # after the abort: dropped on arrival
    assert inbox.get((2, 0), 4, done=3) is None  # step 4 is aborted: the loop leaves it
    inbox.put(Frame(DATA, (1, 0), 5, "a5"))
    assert inbox.get((1, 0), None, done=3).value == "a5"  # a4 skipped
    inbox.put(Frame(DATA, (2, 0), 7, "b7"))
    assert inbox.get((2, 0), 6, done=5) is None  # a later step's frame: step 6 was left behind
    a, b = socket.socketpair()
    eofs = []
    inbox.on_eof = eofs.append
    inbox.add(b, 6)  # the waiting loop reads its connections itself
    got = []
    t = threading.Thread(target=lambda: got.append(inbox.get((9, 9), None, done=-1)))
    t.start()
    time.sleep(0.05)
    send_frame(a, DATA, (9, 9), 8, "woken")
    t.join(5)
    assert got[0].value == "woken"
    a.close()  # the sender's end closes: reported, and the wait goes on until the plane stops
    stopped = []

    def wait_stopped() -> None:
        with pytest.raises(DataPlaneStoppedError):
            inbox.get((9, 9), None, -1)
        stopped.append(True)

    t = threading.Thread(target=wait_stopped)
    t.start()
    deadline = time.monotonic() + 5
    while not eofs and time.monotonic() < deadline:
        time.sleep(0.01)
    assert eofs == [6] and t.is_alive()
    inbox.stop()  # from another thread
    t.join(5)
    assert stopped


@pytest.mark.parametrize("tcp", [True, False])
def test_listener_takes_only_connections_with_the_token(tcp):
    eofs = []
    token, inbox = new_token(), Inbox(on_eof=eofs.append)
    listener = Listener(token, inbox, "127.0.0.1" if tcp else None)
    try:
        address = Address("n1", listener.path, listener.tcp)
        here = "n2" if tcp else "n1"  # another node: TCP
        bad = connect(address, here, new_token(), 5, timeout_s=5)  # a wrong token
        bad.settimeout(5)
        assert bad.recv(1) == b""  # closed by the listener without reading a frame
        bad.close()
        raw = socket.create_connection(listener.tcp) if tcp else socket.socket(socket.AF_UNIX)
        if not tcp:
            raw.connect(listener.path)
        raw.sendall(HELLO.pack(b"XXXX", 1, token))  # the token but no magic
        raw.settimeout(5)
        assert raw.recv(1) == b""
        raw.close()
        good = connect(address, here, token, 2, timeout_s=5)
        listener.wait_senders([2], 5)
        with pytest.raises(ConnectionError, match=r"senders \[5\] did not connect"):
            listener.wait_senders([2, 5], 0.2)  # the one with the wrong token never joined
        send_frame(good, DATA, (4, 0), 1, "hello")
        assert inbox.get((4, 0), None, done=-1).value == "hello"
        good.close()
        inbox.pump()
        assert eofs == [2]  # only the authenticated sender's end is reported
        assert (listener.tcp is not None) == tcp and MAGIC == b"NSDP"
    finally:
        listener.close()


def test_two_loops_sending_large_frames_to_each_other_do_not_deadlock():
    """Each sends 8 MiB (far more than a socket buffer) to the other before reading: the sends
    read their own inbox while the other's buffer is full."""
    big = np.ones((2048, 1024), np.float32)
    ab_send, ab_recv = socket.socketpair()
    ba_send, ba_recv = socket.socketpair()
    out: dict[str, object] = {}

    def loop(name: str, send: socket.socket, recv: socket.socket, sender: int) -> None:
        inbox = Inbox()
        inbox.add(recv, sender)
        send.setblocking(False)
        send_frame(send, DATA, (1, 0), 1, (big, big), inbox)
        out[name] = inbox.get((1, 0), None, done=0).value

    threads = [threading.Thread(target=loop, args=("a", ab_send, ba_recv, 1), daemon=True),
               threading.Thread(target=loop, args=("b", ba_send, ab_recv, 0), daemon=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(out) == {"a", "b"} and all(np.array_equal(v[1], big) for v in out.values())
