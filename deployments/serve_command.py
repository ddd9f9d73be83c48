"""`nextserve serve`: run ray_config.yaml's application on the Ray cluster this machine can reach,
or on a local one started here. SIGINT/SIGTERM stops what this command started: its Serve app
and, when it started them, Serve and the local Ray cluster."""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

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


def serve_forever(config: str | None, model: str | None, port: int | None, host: str | None,
                  ingress: str | None = None) -> int:
    import ray
    from ray import serve

    from deployments.app import build_app

    path = Path(config) if config else DEFAULT_CONFIG
    app, args, http = load_app_config(path, model)
    if ingress is not None:
        args["serve"] = {**(args.get("serve") or {}), "ingress": ingress}
    host = host or http.get("host", "127.0.0.1")
    port = port if port is not None else int(http.get("port", 8000))
    settings = NextserveConfig.from_args(args)
    options = deployment_options(app)
    try:  # checks the checkpoint's config too: a mistake ends here, before Ray starts
        application = build_app(args, deployment_options=options, ingress_resolved=True)
    except NextserveConfigError as e:
        raise ServeUsageError(str(e)) from None
    choice = resolve_ingress(settings, options, host, port)
    direct = choice.mode == "direct"
    print(f"nextserve: ingress {choice.mode}: {choice.why}", file=sys.stderr, flush=True)
    # Serve reads its direct-ingress settings from the environment of the processes the local
    # cluster starts (controller, proxy, replica): set before Ray starts, inherited by them.
    saved_env = dict(os.environ)
    if direct:
        os.environ.update(direct_ingress_environment(port))
    try:
        started_ray = _connect(settings, allow_join=not direct)
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
    name, prefix = app.get("name", "nextserve"), app.get("route_prefix", "/")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        # Direct ingress: the replica serves `port` itself; Serve's proxy, which Serve still runs,
        # takes a free port nobody needs to know.
        serve.start(http_options={"host": host, "port": _free_port(host) if direct else port})
        serve.run(application, name=name, route_prefix=prefix)
        how = ("direct ingress: the replica serves this port itself" if direct
               else "through Serve's HTTP proxy")
        print(f"nextserve: serving {args.get('model') or 'the built-in tiny model'} at "
              f"http://{host}:{port}{prefix.rstrip('/')}/v1 ({how}) (Ctrl-C stops)", file=sys.stderr,
              flush=True)
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


@dataclass(frozen=True)
class IngressChoice:
    """The ingress `nextserve serve` uses and why (logged at start-up)."""

    mode: Literal["proxy", "direct"]
    why: str


def max_replicas(options: dict[str, Any]) -> int | str:
    """The most engine replicas the deployment options allow: num_replicas, or with autoscaling
    its max_replicas (Serve's default 1); `num_replicas: auto` autoscales with Serve's default
    ceiling unless autoscaling_config sets one ("auto" then)."""
    scaling = options.get("autoscaling_config") or {}
    replicas = options.get("num_replicas", 1)
    if replicas == "auto":
        return scaling.get("max_replicas", "auto")
    return scaling.get("max_replicas", 1) if scaling else replicas


def choose_ingress(setting: str, replicas: int | str, join_address: str | None, port_error: str | None,
                   serve_has_direct_ingress: bool = True) -> IngressChoice:
    """serve.ingress `setting` (auto, proxy or direct) against what direct ingress needs: one
    engine replica at most (`replicas`, from `max_replicas`), a Ray cluster `nextserve serve`
    starts itself (`join_address`: the cluster it would join instead, if any: Serve reads direct
    ingress from the environment its processes start with), the port free (`port_error`: why it
    is not) and a Ray Serve that has it. `auto` takes direct where all hold, else the proxy;
    `direct` refuses what it cannot do (ServeUsageError). A port nothing can listen on is refused
    under `auto` too: the proxy could not listen there either."""
    if setting == "proxy":
        return IngressChoice("proxy", "serve.ingress: proxy")
    if setting not in ("auto", "direct"):
        raise ServeUsageError(f"serve.ingress: {setting!r} is not one of auto, proxy, direct")
    explicit = setting == "direct"
    obstacles = []
    if replicas != 1:
        several = "up to Serve's default max_replicas" if replicas == "auto" else str(replicas)
        obstacles.append(f"the {DEPLOYMENT_NAME} deployment may run {several} replicas (max_replicas / "
                         f"num_replicas): the proxy balances over several")
    if join_address is not None:
        obstacles.append(f"a Ray cluster to join ({join_address}: cluster.ray_address, $RAY_ADDRESS or "
                         f"one running here); direct ingress needs one that `nextserve serve` starts "
                         f"itself (Serve reads it from the environment its processes start with)")
    if not serve_has_direct_ingress:
        obstacles.append("this Ray Serve has no direct ingress (Ray 2.60 has it)")
    if obstacles and not explicit:
        return IngressChoice("proxy", f"serve.ingress: auto chose Serve's proxy: {obstacles[0]}")
    if obstacles:
        raise ServeUsageError(f"serve.ingress: direct serves from one engine replica's own port, but "
                              f"{obstacles[0]}; use serve.ingress: proxy (or auto)")
    if port_error is not None:
        raise ServeUsageError(f"--port: {port_error}")
    if explicit:
        return IngressChoice("direct", "serve.ingress: direct")
    return IngressChoice("direct", "serve.ingress: auto chose direct ingress: one engine replica, a Ray "
                                   "cluster started here, the port free")


def resolve_ingress(settings: NextserveConfig, options: dict[str, Any], host: str,
                    port: int) -> IngressChoice:
    """`choose_ingress` on this machine: the deployment's replicas, a cluster to join, the port."""
    replicas = max_replicas(options)
    join = settings.cluster.ray_address or os.environ.get("RAY_ADDRESS") or _running_local_cluster()
    port_error = None
    if settings.serve.ingress != "proxy" and replicas == 1 and join is None:
        port_error = _port_error(host, port)
    return choose_ingress(settings.serve.ingress, replicas, join, port_error,
                          importlib.util.find_spec("ray.serve._private.direct_ingress_http_util") is not None)


def _port_error(host: str, port: int) -> str | None:
    """Why nothing can listen on host:port, or None. SO_REUSEADDR as uvicorn binds: a port left
    in TIME_WAIT by the last server's connections is free to listen on."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as e:
        return f"cannot listen on {host}:{port} ({e.strerror})"
    return None


def direct_ingress_environment(port: int) -> dict[str, str]:
    """Ray Serve 2.60's direct ingress, confined to `port`: the replica's HTTP server takes it (its
    port range is that one port), a replacement replica takes it again at once (no quarantine),
    and a stopping replica does not wait for an external load balancer to drain it."""
    return {"RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1),  # exclusive
            "RAY_SERVE_PORT_QUARANTINE_S": "0",
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "0"}


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _connect(settings: NextserveConfig, allow_join: bool = True) -> bool:
    """Join the configured or running Ray cluster, else start a local one; True if started."""
    import ray

    from cluster.session import start_local_ray

    # Replicas and actors import nextserve's packages from this checkout.
    runtime_env = {"env_vars": {"PYTHONPATH": str(REPO_ROOT)}}
    address = settings.cluster.ray_address or os.environ.get("RAY_ADDRESS") or _running_local_cluster()
    if address is not None and allow_join:
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
