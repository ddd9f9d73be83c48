"""NextserveConfig: the one typed view of nextserve's settings in ray_config.yaml, and the file's
reader. The file is a Ray Serve config; nextserve's own settings are the first application's
`args`: the cluster executor's (cluster/config.py), the engine's (engine/config.py) and the
server's (`serve`, here). Checked when read, frozen afterwards; every error names the key path
and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, SecretStr, ValidationError

from cluster.config import ClusterConfig
from engine.config import EngineLimits, NextserveConfigError, Settings

ARGS_PATH = "applications[0].args"


class ServeSettings(Settings):
    served_model_name: str | None = Field(None, description="the name clients pass as `model` "
                                                            "(default: the checkpoint directory's name)")
    max_queued_requests: int = Field(64, ge=0, description="requests that may wait for a slot per engine "
                                                           "replica; beyond that: HTTP 429")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429 and 503 replies")
    request_timeout_s: float | None = Field(
        None, gt=0, description="a request unfinished this long after it arrived (waiting included) is "
                                "aborted: HTTP 504, or an error event in a stream (default: no limit)")
    ingress: Literal["auto", "proxy", "direct"] = Field(
        "auto", description="proxy: clients reach the replica through Ray Serve's HTTP proxy (any "
                            "number of replicas, load-balanced); direct: `nextserve serve` has the one "
                            "engine replica serve HTTP on http_options.port itself (Ray Serve's direct "
                            "ingress), no proxy hop and no per-token Ray stream; a cluster it starts "
                            "itself and one replica only; auto: direct where `nextserve serve` can give "
                            "it, the proxy otherwise (and always under `serve run` / `serve deploy`)")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in each engine "
                                                              "replica (default: torch's)")
    max_request_bytes: int = Field(4 << 20, ge=1024, description="largest request body; larger: HTTP 413")
    max_prompts_per_request: int | None = Field(
        None, ge=1, description="most prompts in one completion request; more: HTTP 400 (default and "
                                "ceiling: max_num_seqs + max_queued_requests, what a replica can admit)")
    api_key: SecretStr | None = Field(
        None, description="clients must send `Authorization: Bearer <key>` on every route but /health "
                          "(default: $NEXTSERVE_API_KEY; neither: no authentication)")
    admin_api_key: SecretStr | None = Field(
        None, description="the bearer key of POST /rebalance (default: $NEXTSERVE_ADMIN_API_KEY; "
                          "neither: the route is off)")
    rebalance_cooldown_s: float = Field(60.0, ge=0, description="POST /rebalance is refused (HTTP 429) "
                                                                "this long after the last one")
    reasoning_parser: Literal["qwen3", "none"] = Field(
        "qwen3", description="qwen3: the chat API returns `<think>...</think>` text as reasoning_content "
                             "(vLLM's --reasoning-parser qwen3); none: it stays in content")
    tool_call_parser: Literal["hermes", "none"] = Field(
        "hermes", description="hermes: `<tool_call>` JSON in the answer becomes tool_calls (vLLM's "
                              "--enable-auto-tool-choice --tool-call-parser hermes); none: requests with "
                              "tools get HTTP 400 unless tool_choice is none")


class NextserveConfig(ClusterConfig):
    model: str | None = Field(None, description="Hugging Face checkpoint directory")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="default: checkpoint's")
    executor: Literal["local", "cluster"] = Field("local", description="where the model runs")
    device: str = Field("cpu", description="torch device of the local executor and of CPU-only actors")
    engine: EngineLimits = Field(default_factory=EngineLimits)
    serve: ServeSettings = Field(default_factory=ServeSettings, description="the HTTP API")

    @classmethod
    def from_yaml(cls, path: str | Path) -> NextserveConfig:
        path = Path(path)
        _, app = read_serve_config(path)
        return cls.from_args(app.get("args") or {}, source=f"{path}: {ARGS_PATH}")

    @classmethod
    def from_args(cls, args: dict[str, Any], source: str = ARGS_PATH) -> NextserveConfig:
        try:
            return cls.model_validate(args)
        except ValidationError as e:
            first = e.errors()[0]
            key = ".".join(str(p) for p in first["loc"])
            value = first.get("input")
            raise NextserveConfigError(f"{source}.{key}: {first['msg']} (got {value!r})") from None


def read_serve_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """A Ray Serve config file (ray_config.yaml): the whole file and its first application entry."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except OSError as e:
        raise NextserveConfigError(f"{path}: cannot read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise NextserveConfigError(f"{path}: not valid YAML ({e})") from None
    apps = raw.get("applications") if isinstance(raw, dict) else None
    if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict):
        raise NextserveConfigError(f"{path}: applications: expected a list of Serve applications")
    return raw, apps[0]
