"""What one engine-core step message costs: a CoreStep carrying one decode token for each of B
requests (engine/core.py), pickled, sent down a multiprocessing pipe to a spawned process and
read there, one way; reported as the median microseconds per message and its pickled size.

    python -m bench.core_message --batch 1 16 32"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import statistics
import time
from multiprocessing.connection import Connection

from engine.core import CoreStep, to_row
from engine.llm_engine import EngineStats, RequestOutput


def step_message(batch: int) -> CoreStep:
    outputs = [RequestOutput(request_id=f"cmpl-{i:032x}-0", new_token_ids=(1234,), new_logprobs=None,
                             finished=False, finish_reason=None, num_prompt_tokens=32, num_output_tokens=17,
                             new_text=" word") for i in range(batch)]
    stats = EngineStats(*range(13))
    return CoreStep(stats=stats, outputs=tuple(map(to_row, outputs)), step_seconds=0.01)


def sink(conn: Connection) -> None:
    """Read until told the count, then answer with the time the last message arrived."""
    while True:
        msg = conn.recv()
        if msg is None:
            conn.send(time.perf_counter())
            return


def one_way_us(batch: int, n: int) -> tuple[float, float]:
    """Median µs of one send, and mean µs to pickle and unpickle the message (the two ends' CPU)."""
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=sink, args=(child,))
    p.start()
    msg = step_message(batch)
    times = []
    for _ in range(n):  # send, and wait for nothing: what the core does each step
        t0 = time.perf_counter()
        parent.send(msg)
        times.append(time.perf_counter() - t0)
    parent.send(None)
    parent.recv()
    p.join()
    send = statistics.median(times)
    t0 = time.perf_counter()
    for _ in range(n):
        pickle.loads(pickle.dumps(msg))
    return 1e6 * send, 1e6 * (time.perf_counter() - t0) / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16, 32])
    p.add_argument("-n", type=int, default=2000)
    a = p.parse_args()
    print("| requests per step | bytes | send µs (median) | pickle + unpickle µs |\n|---:|---:|---:|---:|")
    for b in a.batch:
        send, roundtrip = one_way_us(b, a.n)
        print(f"| {b} | {len(pickle.dumps(step_message(b)))} | {send:.1f} | {roundtrip:.1f} |")


if __name__ == "__main__":
    main()
