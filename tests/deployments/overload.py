"""A burst past a replica's slots and queue, for the 429 tests of both ingress paths."""

from __future__ import annotations

import threading
import time

import requests


def burst(url: str, body: dict, n: int, expect_refused: int, headers: dict | None = None,
          ) -> list[tuple[int, str | None, str | None]]:
    """`n` streamed completions at once; each accepted one holds its slot (or queue place) until
    `expect_refused` have been refused, or 30 s. Returns (status, Retry-After, error type) each."""
    statuses: list[tuple[int, str | None, str | None]] = []
    release = threading.Event()

    def one() -> None:
        with requests.post(f"{url}/v1/completions", json=body, headers=headers, stream=True,
                           timeout=(5, 60)) as r:
            error = None if r.status_code == 200 else r.json()["error"]["type"]
            statuses.append((r.status_code, r.headers.get("Retry-After"), error))
            if r.status_code == 200:
                release.wait(60)

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while sum(s == 429 for s, _, _ in statuses) < expect_refused and time.monotonic() < deadline:
        time.sleep(0.05)
    release.set()
    for t in threads:
        t.join(60)
    return statuses
