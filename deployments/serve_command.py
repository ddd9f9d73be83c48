"""`nextserve serve`: run ray_config.yaml's application on the Ray cluster this machine can reach,
or on a local one started here. SIGINT/SIGTERM stops what this command started: its Serve app
and, when it started them, Serve and the local Ray cluster."""

from __future__ import annotations

import os
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

from deployments.config import NextserveConfig, read_serve_config
from engine.config import NextserveConfigError

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "ray_config.yaml"
DEPLOYMENT_NAME = "NextserveServer"


class ServeUsageError(Exception):
    """A bad flag or config value; the CLI prints it as one line, exit code 2."""


def load_app_config(path: Path, model: str | None) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(application entry, its args with --model applied, the file's http_options)."""
    try:
        raw, app = read_serve_config(path)
    except NextserveConfigError as e:
        raise ServeUsageError(f"--config: {e}") from None
    args = dict(app.get("args") or {})
    if model is not None:
        args["model"] = model
    try:
        NextserveConfig.from_args(args, source=f"{path}: applications[0].args")
    except NextserveConfigError as e:
        raise ServeUsageError(str(e)) from None
    return app, args, dict(raw.get("http_options") or {})


def deployment_options(app: dict[str, Any]) -> dict[str, Any]:
    for d in app.get("deployments") or []:
        if isinstance(d, dict) and d.get("name") == DEPLOYMENT_NAME:
            return {k: v for k, v in d.items() if k != "name"}
    return {}


def serve_forever(config: str | None, model: str | None, port: int | None, host: str | None) -> int:
    import ray
    from ray import serve

    from deployments.app import build_app

    path = Path(config) if config else DEFAULT_CONFIG
    app, args, http = load_app_config(path, model)
    host = host or http.get("host", "127.0.0.1")
    port = port if port is not None else int(http.get("port", 8000))
    settings = NextserveConfig.from_args(args)
    try:  # checks the checkpoint's config too: a mistake ends here, before Ray starts
        application = build_app(args, deployment_options=deployment_options(app))
    except NextserveConfigError as e:
        raise ServeUsageError(str(e)) from None
    started_ray = _connect(settings)
    name, prefix = app.get("name", "nextserve"), app.get("route_prefix", "/")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(application, name=name, route_prefix=prefix)
        print(f"nextserve: serving {args.get('model') or 'the built-in tiny model'} at "
              f"http://{host}:{port}{prefix.rstrip('/')}/v1 (Ctrl-C stops)", file=sys.stderr, flush=True)
        stop.wait()
    finally:
        print("nextserve: stopping", file=sys.stderr, flush=True)
        try:
            if started_ray:
                serve.shutdown()
            else:
                serve.delete(name)
        finally:
            if started_ray:
                ray.shutdown()
    return 0


def _connect(settings: NextserveConfig) -> bool:
    """Join the configured or running Ray cluster, else start a local one; True if started."""
    import ray

    from cluster.session import start_local_ray

    # Replicas and actors import nextserve's packages from this checkout.
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    address = settings.cluster.ray_address or os.environ.get("RAY_ADDRESS") or _running_local_cluster()
    if address is not None:
        try:
            ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
            return False
        except ConnectionError:
            raise ServeUsageError(f"cluster.ray_address: no Ray cluster at {address!r}") from None
    need = 1.0  # the engine replica
    if settings.executor == "cluster":
        pools = settings.pools
        need += sum(p.actors * p.resources.num_cpus for p in (pools.attention, pools.deltanet, pools.experts))
    # Logical CPUs: a small machine may oversubscribe its cores rather than fail to place actors.
    start_local_ray(max(int(need + 0.999), os.cpu_count() or 1), runtime_env)  # loopback only
    return True


def _running_local_cluster() -> str | None:
    """The address of a Ray cluster started on this machine, if its GCS answers. Ray's own
    `address="auto"` trusts the address file and retries a dead (or unreachable) GCS for minutes."""
    file = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
    try:
        address = file.read_text().strip()
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=1):
            return address
    except (OSError, ValueError):
        return None
