"""From the `pools` of ray_config.yaml and a model to a concrete placement: which mixer actor holds
which decoder layers, which expert shard holds which experts; checked against the model and the
cluster's nodes at start-up, each error naming its key. No actor is started here."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cluster.config import ClusterConfig, Pools
from engine.config import NextserveConfigError
from model.config import ModelConfig
from router.placement import ExpertPlacement, PlacementError, even_split

POOL_OF_KIND = {"full_attention": "attention", "linear_attention": "deltanet"}


@dataclass(frozen=True)
class MixerSpec:
    """One attention or DeltaNet actor: its layers (ascending) and whether it also holds the
    embedding (it runs layer 0) or the final norm and LM head (it runs the last layer)."""

    pool: str
    index: int
    layers: tuple[int, ...]
    embeds: bool
    has_head: bool

    @property
    def name(self) -> str:
        return f"{self.pool}-{self.index}"


@dataclass(frozen=True)
class ClusterPlacement:
    mixers: tuple[MixerSpec, ...]
    owner: tuple[int, ...]  # owner[l]: index into `mixers` of the actor that runs layer l
    experts: ExpertPlacement | None  # None: the model has no MoE layer, so no shard is started

    @property
    def num_shards(self) -> int:
        return 0 if self.experts is None else self.experts.num_shards


def resolve_placement(pools: Pools, model: ModelConfig) -> ClusterPlacement:
    layer_lists: dict[int, tuple[str, int]] = {}
    per_pool: dict[str, list[tuple[int, ...]]] = {}
    for kind, pool_name in POOL_OF_KIND.items():
        wanted = tuple(i for i, t in enumerate(model.layer_types) if t == kind)
        if not wanted:
            continue  # e.g. the deltanet pool of a Qwen3 MoE model
        pool = getattr(pools, pool_name)
        key = f"pools.{pool_name}"
        if pool.actors > len(wanted):
            raise NextserveConfigError(f"{key}.actors: {pool.actors} actors for {len(wanted)} {kind} layers "
                                       f"{list(wanted)}; an actor with no layer would idle")
        if pool.layers is None:
            lists = even_split(wanted, pool.actors)
        else:
            lists = [tuple(sorted(x)) for x in pool.layers]
        for a, layers in enumerate(lists):
            if not layers:
                raise NextserveConfigError(f"{key}.layers[{a}]: actor {a} holds no layer")
            for layer in layers:
                if layer not in wanted:
                    raise NextserveConfigError(f"{key}.layers[{a}]: layer {layer} is not a {kind} layer "
                                               f"(those are {list(wanted)})")
                if layer in layer_lists:
                    raise NextserveConfigError(f"{key}.layers[{a}]: layer {layer} is also held by actor "
                                               f"{layer_lists[layer][1]}; a layer's cache lives in one actor")
                layer_lists[layer] = (pool_name, a)
        missing = [layer for layer in wanted if layer not in layer_lists]
        if missing:
            raise NextserveConfigError(f"{key}.layers: layers {missing} are held by no actor")
        per_pool[pool_name] = lists

    last = model.num_hidden_layers - 1
    mixers = tuple(MixerSpec(pool, a, layers, 0 in layers, last in layers)
                   for pool, lists in per_pool.items() for a, layers in enumerate(lists))
    index = {(m.pool, m.index): i for i, m in enumerate(mixers)}
    owner = tuple(index[layer_lists[layer]] for layer in range(model.num_hidden_layers))
    return ClusterPlacement(mixers, owner, _expert_placement(pools, model))


def _expert_placement(pools: Pools, model: ModelConfig) -> ExpertPlacement | None:
    if not model.moe_layers:
        return None
    pool = pools.experts
    if pool.actors > model.num_experts:
        raise NextserveConfigError(f"pools.experts.actors: {pool.actors} shards for {model.num_experts} "
                                   f"experts; a shard with no expert would idle")
    try:
        if pool.experts is None:
            return ExpertPlacement.even(model.num_experts, pool.actors)
        for a, ids in enumerate(pool.experts):
            if not ids:
                raise NextserveConfigError(f"pools.experts.experts[{a}]: shard {a} holds no expert")
        return ExpertPlacement.from_lists(model.num_experts, pool.experts)
    except PlacementError as e:
        raise NextserveConfigError(f"pools.experts.experts: {e}") from None


def check_resources(pools: Pools, placement: ClusterPlacement,
                    nodes: Sequence[Mapping[str, float]]) -> None:
    """Every pool's per-actor bundle must fit on some node (and a STRICT_PACK pool's bundles on one
    node together); otherwise the placement group would wait forever, so fail now, naming the key.
    `nodes`: the total resources of each alive node (ray.nodes()[i]["Resources"])."""
    used = {m.pool for m in placement.mixers} | ({"experts"} if placement.num_shards else set())
    for name in ("attention", "deltanet", "experts"):
        if name not in used:
            continue
        pool = getattr(pools, name)
        bundle = pool.resources.as_bundle()
        if not any(_fits(node, bundle) for node in nodes):
            key = next((k for k, v in bundle.items() if not any(node.get(k, 0) >= v for node in nodes)), None)
            field = {"CPU": "num_cpus", "GPU": "num_gpus"}.get(key, f"resources.{key}") if key else ""
            best = max((node.get(key, 0) for node in nodes), default=0) if key else None
            where = f"pools.{name}.resources" + (f".{field}" if field else "")
            detail = (f"{bundle[key]} per actor, but no node has more than {best} {key}" if key
                      else f"{bundle} per actor fits no single node")
            raise NextserveConfigError(f"{where}: {detail}")
        if pool.strategy == "STRICT_PACK":
            total = {k: v * pool.actors for k, v in bundle.items()}
            if not any(_fits(node, total) for node in nodes):
                raise NextserveConfigError(f"pools.{name}.strategy: STRICT_PACK needs {total} on one node; "
                                           f"none has that much")
        if pool.strategy == "STRICT_SPREAD" and pool.actors > sum(_fits(n, bundle) for n in nodes):
            raise NextserveConfigError(f"pools.{name}.strategy: STRICT_SPREAD puts {pool.actors} actors on "
                                       f"distinct nodes, but only {sum(_fits(n, bundle) for n in nodes)} "
                                       f"nodes fit one")


def _fits(node: Mapping[str, float], bundle: Mapping[str, float]) -> bool:
    return all(node.get(k, 0) >= v for k, v in bundle.items())


def check_transport(settings: ClusterConfig, placement: ClusterPlacement) -> None:
    """Torch tensors on the edges are moved by Ray's compiled graph (NCCL between GPUs, one whole
    GPU per actor; shm through shared memory)."""
    c = settings.cluster
    if c.tensor_transport == "host":
        return
    # The sockets data plane carries host arrays; plain remote calls pass torch tensors through
    # the object store (shm works there, NCCL does not).
    nccl = c.tensor_transport == "accelerator"
    if c.data_plane == "sockets" or (nccl and c.data_plane != "compiled_graph"):
        raise NextserveConfigError(f"cluster.tensor_transport: {c.tensor_transport} needs "
                                   f"cluster.data_plane: compiled_graph, got {c.data_plane}")
    if c.tensor_transport != "accelerator":
        return
    used = {m.pool for m in placement.mixers} | ({"experts"} if placement.experts is not None else set())
    for name in sorted(used):
        gpus = getattr(settings.pools, name).resources.num_gpus
        if gpus < 1:
            raise NextserveConfigError(f"cluster.tensor_transport: accelerator needs a whole GPU per actor, "
                                       f"but pools.{name}.resources.num_gpus is {gpus:g}")
