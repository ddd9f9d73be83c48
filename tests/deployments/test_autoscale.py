"""Serve autoscaling of engine replicas: a bounded burst of requests (on loopback) takes the
deployment from one replica to two, it goes back to one after the burst, and every request
completes with the tokens it gets alone (up to a float32 near tie: tests/near_ties.py). Each
replica runs the local executor (cheap on 2 cores); the autoscaling keys are those of
ray_config.yaml's `deployments[0]`, with short delays.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest tests/deployments -q'"""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests
import yaml

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from tests.near_ties import GreedyReference  # noqa: E402
from tests.serve_app import running_app  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MAX_TOKENS, NUM_REQUESTS, CONCURRENCY = 160, 40, 8
DEPLOYMENT = yaml.safe_load("""
ray_actor_options: {num_cpus: 1}
graceful_shutdown_wait_loop_s: 0.5
graceful_shutdown_timeout_s: 30    # a replica scaled down finishes its requests first
autoscaling_config:
  min_replicas: 1
  max_replicas: 2
  target_ongoing_requests: 2
  upscale_delay_s: 0.5
  downscale_delay_s: 3
  look_back_period_s: 1
""")


def running_replicas() -> int:
    app = serve.status().applications.get("nextserve")
    if app is None or "NextserveServer" not in app.deployments:
        return 0
    return app.deployments["NextserveServer"].replica_states.get("RUNNING", 0)


def wait_for_replicas(n: int, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while (got := running_replicas()) != n and time.monotonic() < deadline:
        time.sleep(0.25)
    return got


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from model.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("autoscale"), arch="qwen3_next")


@pytest.fixture(scope="module")
def base_url(tiny_dir):
    # Serve pushes autoscaling metrics every 10 s by default; a bounded test burst is shorter.
    os.environ["RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.25"
    os.environ["RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S"] = "0.25"
    args = dict(model=str(tiny_dir), dtype="float32", executor="local",
                engine=dict(max_num_seqs=4, max_model_len=256, max_num_batched_tokens=256),
                serve=dict(served_model_name="tiny", max_queued_requests=32, torch_threads=1))
    with running_app(args, num_cpus=4, deployment_options=DEPLOYMENT) as url:
        yield url


def prompt(i: int) -> list[int]:
    return [3 + i, 17, 40 + 2 * i, 9]


def test_replicas_scale_up_under_load_and_back_down(base_url, tiny_dir):
    assert wait_for_replicas(1, 30) == 1
    seen = [running_replicas()]
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            seen.append(running_replicas())
            time.sleep(0.2)

    def complete(i: int) -> list[int]:
        body = dict(model="tiny", prompt=prompt(i), max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True,
                    return_token_ids=True)
        r = requests.post(f"{base_url}/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["token_ids"]

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    start = time.monotonic()
    # The burst lasts until the second replica runs (bounded): how long a replica takes to start
    # (a process, its weights, its engine core) depends on what else the machine is doing.
    got: list[list[int]] = []
    deadline = start + 120
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        while len(got) < NUM_REQUESTS or (max(seen) < 2 and time.monotonic() < deadline):
            got += pool.map(complete, range(len(got), len(got) + CONCURRENCY))
    burst_s, burst = time.monotonic() - start, len(got)
    assert max(seen) == 2, seen
    # One request at a time is below the target, so Serve scales down while requests are in
    # flight: the replica it stops is drained first, so none of them is cut.
    deadline = time.monotonic() + 60
    while running_replicas() != 1 and time.monotonic() < deadline:
        got.append(complete(len(got)))
    got.append(complete(len(got)))
    down = wait_for_replicas(1, 30)
    stop.set()
    watcher.join()
    print(f"\nautoscale: {burst} requests x {MAX_TOKENS} tokens in {burst_s:.1f}s, then "
          f"{len(got) - burst} one at a time; replicas seen {sorted(set(seen))}; back to {down}")
    assert down == 1

    reference = GreedyReference(tiny_dir)
    for i, tokens in enumerate(got):  # each as it comes out alone, up to a float32 near tie
        reference.check(prompt(i), tokens, MAX_TOKENS, what=f"request {i}")
