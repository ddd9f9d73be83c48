"""NextserveConfig: the one typed view of nextserve's settings in ray_config.yaml. The file is a
Ray Serve config; nextserve's own settings are the first application's `args`. Checked when read,
frozen afterwards; every error names the key path and the value."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
ARGS_PATH = "applications[0].args"


class NextserveConfigError(ValueError):
    """A config file nextserve cannot run with; the message names the key and the value."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ActorResources(_Frozen):
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor (Ray logical CPUs)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractions share a GPU")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="custom Ray resources per actor, e.g. {node_kind_a: 1}")

    def as_bundle(self) -> dict[str, float]:
        """The placement-group bundle of one actor."""
        bundle = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {k: v for k, v in bundle.items() if v > 0}


class _Pool(_Frozen):
    actors: int = Field(1, ge=1, description="number of actors in the pool")
    resources: ActorResources = Field(default_factory=ActorResources, description="resources per actor")
    strategy: PlacementStrategy = Field("PACK", description="placement-group strategy of the pool's bundles")
    label_selector: dict[str, str] = Field(
        default_factory=dict, description="node labels every actor of the pool needs, e.g. {pool: experts} "
                                          "for nodes started with `ray start --labels pool=experts`")


class MixerPool(_Pool):
    layers: list[list[int]] | None = Field(
        None, description="layers[a]: the decoder layers actor a holds (default: contiguous even split "
                          "of this pool's layer kind); unused when the model has no layer of the kind")

    @model_validator(mode="after")
    def _one_list_per_actor(self) -> MixerPool:
        if self.layers is not None and len(self.layers) != self.actors:
            raise ValueError(f"layers: {len(self.layers)} lists for actors={self.actors}")
        return self


class ExpertPool(_Pool):
    experts: list[list[int]] | None = Field(
        None, description="experts[a]: routed experts shard a holds in every MoE layer (default: even "
                          "split); an expert listed on several shards is a redundant copy")

    @model_validator(mode="after")
    def _one_list_per_actor(self) -> ExpertPool:
        if self.experts is not None and len(self.experts) != self.actors:
            raise ValueError(f"experts: {len(self.experts)} lists for actors={self.actors}")
        return self


class Pools(_Frozen):
    attention: MixerPool = Field(default_factory=MixerPool, description="full-attention actors")
    deltanet: MixerPool = Field(default_factory=MixerPool, description="Gated DeltaNet actors")
    experts: ExpertPool = Field(default_factory=lambda: ExpertPool(actors=2), description="expert shards")


class EngineLimits(_Frozen):
    max_num_seqs: int = Field(16, ge=1, description="sequence slots: most sequences in flight")
    max_model_len: int | None = Field(None, ge=1,
                                      description="tokens per sequence (default: min(model's, 4096))")
    max_num_batched_tokens: int = Field(2048, ge=1, description="most tokens in one engine step")
    block_size: int = Field(16, ge=1, description="tokens per KV-cache block (the unit the engine hands "
                                                  "out to sequences)")
    num_kv_blocks: int | None = Field(
        None, ge=1, description="KV-cache blocks per attention layer (default: max_num_seqs × ceil("
                                "max_model_len / block_size), so no sequence is ever preempted); fewer "
                                "blocks hold less memory, and sequences are preempted and recomputed "
                                "when they run out")
    compile: bool = Field(
        False, description="local executor: run decode steps through torch.compile'd layers (3-6x faster "
                           "steps on small models), one graph per batch-size bucket, compiled on the first "
                           "step of each bucket, which then waits tens of seconds on a small CPU; needs a "
                           "C++ compiler at run time (default off for those two reasons); other steps stay "
                           "eager")


class ClusterSettings(_Frozen):
    ray_address: str | None = Field(
        None, description="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster started and "
                          "stopped by nextserve)")
    compiled_graph: bool = Field(True, description="run the step as a Ray Compiled Graph (false: one "
                                                   "remote call per hop, the slower fallback)")
    micro_batch_tokens: int = Field(
        0, ge=0, description="steps with at least this many tokens are split into two micro-batches so "
                               "that mixers and expert shards overlap (0: never split)")
    tensor_transport: Literal["host", "accelerator", "shm"] = Field(
        "host", description="how tensors cross the step graph's edges: host (numpy arrays through "
                            "Ray's shared memory / object store; CPU actors, and the safe default), "
                            "accelerator (torch tensors GPU to GPU by NCCL; every pool in use needs "
                            "num_gpus >= 1 and compiled_graph), shm (torch tensors through shared "
                            "memory: the accelerator code path on CPU, for testing)")
    buffer_size_bytes: int = Field(1 << 20, ge=1024, description="initial compiled-graph channel buffer; "
                                                                 "channels grow for larger messages")
    idle_release_s: float = Field(
        30.0, ge=0, description="after this many seconds without a request the compiled graph is torn "
                                "down (its actors poll their channels, ~half a core each, while it "
                                "stands) and compiled again by the next step (0: keep it)")
    timeout_s: float = Field(120.0, gt=0, description="longest wait for actor start-up (loading weights)")
    step_timeout_s: float = Field(
        15.0, gt=0, description="longest wait for one engine step; past it the step's actors are taken "
                                "for dead and restarted (a dead actor is usually noticed at once)")


class RebalanceSettings(_Frozen):
    period_s: float = Field(0.0, ge=0, description="how often each engine replica looks at its expert load "
                                                   "and may rebalance (0: never by itself; the `nextserve "
                                                   "rebalance` command still works)")
    threshold: float = Field(1.25, ge=1.0, description="rebalance when max / mean expert-shard load over the "
                                                       "last period exceeds this (1.0: perfectly even)")
    redundant_experts: int = Field(0, ge=0, description="extra copies of hot experts, spread over the shards "
                                                        "(each shard then holds about (E + this) / shards)")
    min_gain: float = Field(0.05, ge=0, lt=1, description="apply a new placement only if it lowers max / "
                                                          "mean shard load by at least this fraction")


class ServeSettings(_Frozen):
    served_model_name: str | None = Field(None, description="the name clients pass as `model` "
                                                            "(default: the checkpoint directory's name)")
    max_queued_requests: int = Field(64, ge=0, description="requests that may wait for a slot per engine "
                                                           "replica; beyond that: HTTP 429")
    retry_after_s: int = Field(1, ge=0, description="Retry-After seconds sent with 429 and 503 replies")
    request_timeout_s: float | None = Field(
        None, gt=0, description="a request unfinished this long after it arrived (waiting included) is "
                                "aborted: HTTP 504, or an error event in a stream (default: no limit)")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads in each engine "
                                                              "replica (default: torch's)")


class NextserveConfig(_Frozen):
    model: str | None = Field(None, description="Hugging Face checkpoint directory")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(None, description="default: checkpoint's")
    executor: Literal["local", "cluster"] = Field("local", description="where the model runs")
    device: str = Field("cpu", description="torch device of the local executor and of CPU-only actors")
    engine: EngineLimits = Field(default_factory=EngineLimits)
    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    pools: Pools = Field(default_factory=Pools)
    serve: ServeSettings = Field(default_factory=ServeSettings, description="the HTTP API")
    rebalance: RebalanceSettings = Field(default_factory=RebalanceSettings,
                                         description="expert load balancing (cluster executor)")

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
