"""The Serve application builder that ray_config.yaml's `import_path` names:
`serve run ray_config.yaml`, `serve deploy ray_config.yaml` and `nextserve serve` all end here."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from ray import serve

from deployments.config import NextserveConfig
from deployments.security import keys_from_environment, max_prompts_per_request
from deployments.server import EngineFactory, NextserveServer
from engine.config import NextserveConfigError
from model.config import ConfigError, ModelConfig

REPO_ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL_DIR = REPO_ROOT / "models" / "tiny-qwen3-next"  # the built-in (trained, shipped) model
# Requests a replica takes on top of its engine's capacity, so that the engine, not Serve's
# proxy queue, sees the overflow and answers 429 at once.
ONGOING_MARGIN = 16
log = logging.getLogger(__name__)


def build_app(args: dict[str, Any], engine_factory: EngineFactory | None = None,
              deployment_options: dict[str, Any] | None = None, *,
              ingress_resolved: bool = False) -> serve.Application:
    """`args` is the application's `args` (NextserveConfig); checked here, before any replica
    starts. `deployment_options` are Serve options (autoscaling_config, ray_actor_options, ...)
    for callers that do not go through a config file's `deployments` list. `ingress_resolved`:
    the caller (`nextserve serve`) chooses and starts serve.ingress itself."""
    config = NextserveConfig.from_args(keys_from_environment(dict(args)))
    max_prompts_per_request(config)  # refuses a limit no replica could honour, before any starts
    model = resolve_model(config.model)
    if (model / "config.json").is_file():  # e.g. a quantization the loader lacks: say so now, once
        try:
            ModelConfig.from_dir(model)
        except ConfigError as e:
            raise NextserveConfigError(f"model: {model}: {e}") from None
    if not ingress_resolved and config.serve.ingress != "proxy" \
            and os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1":
        # Only `nextserve serve` starts Serve with direct ingress; `serve run` keeps Serve's proxy.
        (log.warning if config.serve.ingress == "direct" else log.info)(
            "serve.ingress: %s: direct ingress takes effect through `nextserve serve` only (or a cluster "
            "started with RAY_SERVE_ENABLE_DIRECT_INGRESS=1); this application is served through "
            "Serve's proxy", config.serve.ingress)
    args = {**keys_from_environment(dict(args)), "model": str(model)}
    capacity = config.engine.max_num_seqs + config.serve.max_queued_requests
    options: dict[str, Any] = dict(max_ongoing_requests=capacity + ONGOING_MARGIN,
                                   ray_actor_options={"num_cpus": 1})
    options.update(deployment_options or {})
    return NextserveServer.options(**options).bind(args, engine_factory)


def resolve_model(model: str | None) -> Path:
    """An absolute checkpoint path (replicas may start elsewhere); a relative one is taken from
    the current directory, else from the repo root. The built-in tiny model ships with the repo."""
    if model is None:
        path = TINY_MODEL_DIR
    else:
        path = Path(model).expanduser()
        if not path.is_absolute():
            path = path.resolve() if path.exists() else REPO_ROOT / path
    if path.resolve() == TINY_MODEL_DIR and not (path / "config.json").is_file():
        raise NextserveConfigError(f"model: the built-in model {TINY_MODEL_DIR} is missing (it ships with "
                                   f"the repository: `git checkout -- models/tiny-qwen3-next`, or retrain "
                                   f"it with scripts/train_tiny_model.py)")
    return path.resolve()
