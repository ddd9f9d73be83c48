"""The cluster executor's settings: actor pools and their placement (`pools`), the step graph and
failure handling (`cluster`), expert rebalancing (`rebalance`)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from engine.config import Settings

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
DataPlane = Literal["sockets", "compiled_graph", "remote_calls"]


class ActorResources(Settings):
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor (Ray logical CPUs)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per actor; fractions share a GPU")
    resources: dict[str, float] = Field(default_factory=dict,
                                        description="custom Ray resources per actor, e.g. {node_kind_a: 1}")

    def as_bundle(self) -> dict[str, float]:
        """The placement-group bundle of one actor."""
        bundle = {"CPU": self.num_cpus, "GPU": self.num_gpus, **self.resources}
        return {k: v for k, v in bundle.items() if v > 0}


class _Pool(Settings):
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


class Pools(Settings):
    attention: MixerPool = Field(default_factory=MixerPool, description="full-attention actors")
    deltanet: MixerPool = Field(default_factory=MixerPool, description="Gated DeltaNet actors")
    experts: ExpertPool = Field(default_factory=lambda: ExpertPool(actors=2), description="expert shards")


class ClusterSettings(Settings):
    ray_address: str | None = Field(
        None, description="Ray cluster to join (default: $RAY_ADDRESS, else a local cluster started and "
                          "stopped by nextserve)")
    data_plane: DataPlane = Field(
        "sockets", description="how the step's messages move between actors: sockets (each actor runs "
                               "its share of the step in a loop and passes messages over blocking Unix "
                               "/ TCP sockets, cluster/dataplane.py; waiting actors burn no CPU), "
                               "compiled_graph (a Ray Compiled Graph; needed by tensor_transport "
                               "accelerator / shm), remote_calls (one Ray call per hop, the slowest)")
    micro_batch_tokens: int = Field(
        0, ge=0, description="steps with at least this many tokens are split into `micro_batches` "
                               "micro-batches so that mixers and expert shards overlap (0: never split)")
    micro_batches: int = Field(
        2, ge=2, description="how many micro-batches (step-graph lanes) a step of >= micro_batch_tokens "
                             "tokens is split into, by whole sequences, near-equal in tokens; unused "
                             "while micro_batch_tokens is 0")
    tensor_transport: Literal["host", "accelerator", "shm"] = Field(
        "host", description="how tensors cross the step graph's edges: host (numpy arrays through "
                            "Ray's shared memory / object store; CPU actors, and the safe default), "
                            "accelerator (torch tensors GPU to GPU by NCCL; every pool in use needs "
                            "num_gpus >= 1 and data_plane compiled_graph), shm (torch tensors through "
                            "shared memory: the accelerator code path on CPU, for testing; "
                            "data_plane compiled_graph)")
    buffer_size_bytes: int = Field(1 << 20, ge=1024, description="initial compiled-graph channel buffer; "
                                                                 "channels grow for larger messages")
    idle_release_s: float = Field(
        30.0, ge=0, description="data_plane compiled_graph: after this many seconds without a request "
                                "the compiled graph is torn down (its actors poll their channels, ~half "
                                "a core each, while it stands) and compiled again by the next step (0: "
                                "keep it); the sockets data plane burns nothing while idle")
    channel_poll_us: float | None = Field(
        None, ge=0, description="compiled graph: a process waiting on a channel sleeps between tries, "
                                "backing off up to this many µs, and leaves its core to the actor that "
                                "computes (cluster/channel_wait.py); 0: Ray's busy wait, the fastest hop "
                                "where every actor and the driver have a core of their own; null: 0 "
                                "there, 200 where the graph's processes outnumber the cores")
    timeout_s: float = Field(120.0, gt=0, description="longest wait for actor start-up (loading weights)")
    @model_validator(mode="before")
    @classmethod
    def _compiled_graph_was_replaced(cls, data: Any) -> Any:
        if isinstance(data, dict) and "compiled_graph" in data:
            raise ValueError(f"cluster.compiled_graph ({data['compiled_graph']!r}) was replaced by "
                             f"cluster.data_plane: sockets | compiled_graph | remote_calls (compiled_graph: "
                             f"true was data_plane: compiled_graph, false was remote_calls; the default "
                             f"is now sockets)")
        return data

    step_timeout_s: float = Field(
        15.0, gt=0, description="longest wait for one engine step; past it the step's actors are taken "
                                "for dead and restarted (a dead actor is usually noticed at once)")


class RebalanceSettings(Settings):
    period_s: float = Field(0.0, ge=0, description="how often each engine replica looks at its expert load "
                                                   "and may rebalance (0: never by itself; the `nextserve "
                                                   "rebalance` command still works)")
    threshold: float = Field(1.25, ge=1.0, description="rebalance when max / mean expert-shard load over the "
                                                       "last period exceeds this (1.0: perfectly even)")
    redundant_experts: int = Field(0, ge=0, description="extra copies of hot experts, spread over the shards "
                                                        "(each shard then holds about (E + this) / shards)")
    min_gain: float = Field(0.05, ge=0, lt=1, description="apply a new placement only if it lowers max / "
                                                          "mean shard load by at least this fraction")


class ClusterConfig(Settings):
    """What the cluster executor reads (the top-level config adds the engine's and the server's)."""

    cluster: ClusterSettings = Field(default_factory=ClusterSettings)
    pools: Pools = Field(default_factory=Pools)
    rebalance: RebalanceSettings = Field(default_factory=RebalanceSettings,
                                         description="expert load balancing (cluster executor)")
