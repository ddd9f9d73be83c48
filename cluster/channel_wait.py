"""How a process waits on a compiled graph's shared-memory channels (`cluster.channel_poll_us`).

Ray reads a channel by spinning in C++ (sem_post + sched_yield until the version it wants is
sealed) and offers no setting for it. With more actors than cores, the idle readers' spinning takes
the cores from the one actor that computes, and every edge waits for its reader to be scheduled
(README, "Hops at real depth"). Here a read instead tries at once
and, while the value is not there, sleeps between tries, backing off from MIN_SLEEP_S to the cap:
an edge costs at most the cap more, and a waiting process leaves its core to the others. Ray's
own read loop already retries reads that time out, so a zero-timeout try is a supported call."""

from __future__ import annotations

import time
from typing import Any

from ray.exceptions import RayChannelTimeoutError
from ray.experimental.channel import shared_memory_channel

MIN_SLEEP_S = 10e-6
OVERSUBSCRIBED_POLL_US = 200.0  # the best cap measured on 2 cores (README, "Hops at real depth")


def auto_channel_poll_us(cores: float, processes: int) -> float:
    """`cluster.channel_poll_us: null`: Ray's busy wait (0) where each of the graph's `processes`
    (actors and the driver) has a core, else polling with the measured cap."""
    return 0.0 if cores >= processes else OVERSUBSCRIBED_POLL_US


def set_channel_poll(poll_us: float) -> float:
    """Channel reads of this process poll, sleeping up to `poll_us` µs between tries (0: Ray's spin).
    Returns `poll_us`; applies to graphs compiled afterwards and to the ones running."""
    cls = shared_memory_channel.Channel
    spin_read = getattr(cls.read, "spin_read", cls.read)
    if poll_us <= 0:
        cls.read = spin_read
        return poll_us
    cap_s = poll_us * 1e-6

    def read(self: Any, timeout: float | None = None) -> Any:
        deadline = None if timeout is None or timeout < 0 else time.monotonic() + timeout
        sleep_s = MIN_SLEEP_S
        while True:
            try:
                return spin_read(self, 0)
            except RayChannelTimeoutError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
            time.sleep(sleep_s)
            sleep_s = min(2 * sleep_s, cap_s)

    read.spin_read = spin_read  # type: ignore[attr-defined]
    cls.read = read
    return poll_us
