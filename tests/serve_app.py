"""One nextserve Serve application for a test module: a fresh local Ray cluster (never another
session's, whatever /tmp/ray says), Serve's proxy on a free loopback port, everything stopped after."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_app(args: dict[str, Any], num_cpus: int, **build_options: Any) -> Iterator[str]:
    """Yields the app's base URL, e.g. http://127.0.0.1:PORT."""
    import ray
    from ray import serve

    from deployments.app import build_app

    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args, **build_options), name="nextserve", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()
