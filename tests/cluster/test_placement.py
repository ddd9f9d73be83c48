"""Placement from ray_config.yaml, without Ray: the config file, default splits, and the start-up
errors (a layer or expert held by no actor, more actors than layers, resources no node can give),
each naming its key; and micro-batch splitting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.micro_batch import join_logits, split_step
from cluster.placement import check_resources, check_transport, resolve_placement
from deployments.config import NextserveConfig
from engine.config import NextserveConfigError
from engine.executor import StepInput
from model.config import ModelConfig
from tests.hf_models import TINY_MOE, TINY_NEXT

ROOT = Path(__file__).resolve().parents[2]
NEXT = ModelConfig.from_hf({**TINY_NEXT, "architectures": ["Qwen3NextForCausalLM"]})  # layers: D D D A D
MOE = ModelConfig.from_hf({**TINY_MOE, "architectures": ["Qwen3MoeForCausalLM"]})  # 4 attention layers
NODE = {"CPU": 4.0, "GPU": 0.0, "memory": 1e9}


def pools(**args):
    return NextserveConfig.from_args({"pools": args}).pools


def test_repo_ray_config_parses_and_places_both_models():
    config = NextserveConfig.from_yaml(ROOT / "ray_config.yaml")
    assert config.executor == "cluster"
    p = resolve_placement(config.pools, NEXT)
    assert [(m.name, m.layers, m.embeds, m.has_head) for m in p.mixers] == [
        ("attention-0", (3,), False, False), ("deltanet-0", (0, 1, 2, 4), True, True)]
    assert p.owner == (1, 1, 1, 0, 1)
    assert p.experts.shards == ((0, 1, 2, 3), (4, 5, 6, 7))
    q = resolve_placement(config.pools, MOE)  # the deltanet pool is unused, not an error
    assert [m.name for m in q.mixers] == ["attention-0"]
    check_resources(config.pools, p, [NODE])


def test_explicit_layers_and_redundant_experts():
    p = resolve_placement(pools(attention={"actors": 2, "layers": [[0, 3], [1, 2]]},
                                experts={"actors": 3, "experts": [[0, 1, 2, 3], [4, 5, 6, 7], [0]]}), MOE)
    assert p.owner == (0, 1, 1, 0)
    assert p.mixers[0].embeds and p.mixers[0].has_head
    assert p.experts.copies(0) == (0, 2)


@pytest.mark.parametrize("args, model, message", [
    ({"attention": {"actors": 2, "layers": [[0, 1], [2]]}}, MOE,
     r"pools\.attention\.layers: layers \[3\] are held by no actor"),
    ({"deltanet": {"actors": 5}}, NEXT, r"pools\.deltanet\.actors: 5 actors for 4 linear_attention layers"),
    ({"attention": {"actors": 2}}, NEXT, r"pools\.attention\.actors: 2 actors for 1 full_attention"),
    ({"deltanet": {"actors": 2, "layers": [[0, 1, 3], [2, 4]]}}, NEXT,
     r"pools\.deltanet\.layers\[0\]: layer 3 is not a linear_attention layer"),
    ({"attention": {"actors": 2, "layers": [[0, 1, 2], [2, 3]]}}, MOE,
     r"pools\.attention\.layers\[1\]: layer 2 is also held by actor 0"),
    ({"experts": {"actors": 2, "experts": [[0, 1, 2], [4, 5, 6, 7]]}}, MOE,
     r"pools\.experts\.experts: experts \[3\] are held by no shard"),
    ({"experts": {"actors": 9}}, MOE, r"pools\.experts\.actors: 9 shards for 8 experts"),
])
def test_placement_errors_name_the_key(args, model, message):
    with pytest.raises(NextserveConfigError, match=message):
        resolve_placement(pools(**args), model)


@pytest.mark.parametrize("resources, strategy, message", [
    ({"num_gpus": 1}, "PACK", r"pools\.experts\.resources\.num_gpus: 1\.0 per actor, but no node has more "
                              r"than 0\.0 GPU"),
    ({"num_cpus": 8}, "PACK", r"pools\.experts\.resources\.num_cpus: 8\.0 per actor"),
    ({"resources": {"big_mem": 1}}, "PACK", r"pools\.experts\.resources\.resources\.big_mem"),
    ({"num_cpus": 3}, "STRICT_PACK", r"pools\.experts\.strategy: STRICT_PACK needs"),
    ({"num_cpus": 1}, "STRICT_SPREAD", r"pools\.experts\.strategy: STRICT_SPREAD puts 2 actors"),
])
def test_resources_no_node_can_give(resources, strategy, message):
    p = pools(experts={"actors": 2, "resources": resources, "strategy": strategy})
    with pytest.raises(NextserveConfigError, match=message):
        check_resources(p, resolve_placement(p, MOE), [NODE])


@pytest.mark.parametrize("args, message", [
    ({"pools": {"experts": {"actors": 0}}}, r"args\.pools\.experts\.actors: Input should be greater than "
                                            r"or equal to 1 \(got 0\)"),
    ({"pools": {"attention": {"actor": 1}}}, r"args\.pools\.attention\.actor: Extra inputs"),
    ({"pools": {"deltanet": {"actors": 2, "layers": [[0]]}}}, r"args\.pools\.deltanet: Value error, "
                                                             r"layers: 1 lists for actors=2"),
    ({"pools": {"experts": {"strategy": "TIGHT"}}}, r"args\.pools\.experts\.strategy: .*'TIGHT'"),
    ({"dtype": "float64"}, r"args\.dtype: .*'float64'"),
    ({"cluster": {"data_plane": "grpc"}}, r"args\.cluster\.data_plane: Input should be 'sockets', "
                                          r"'compiled_graph' or 'remote_calls'"),
    ({"cluster": {"compiled_graph": True}},
     r"args\.cluster: Value error, cluster\.compiled_graph \(True\) was replaced by cluster\.data_plane: "
     r"sockets \| compiled_graph"),
])
def test_config_errors_name_the_key_and_value(tmp_path, args, message):
    import yaml

    path = tmp_path / "ray_config.yaml"
    path.write_text(yaml.safe_dump({"applications": [{"name": "x", "import_path": "a:b", "args": args}]}))
    with pytest.raises(NextserveConfigError, match=message):
        NextserveConfig.from_yaml(path)


@pytest.mark.parametrize("args, message", [
    ({"cluster": {"tensor_transport": "nccl"}}, "cluster.tensor_transport: Input should be 'host', "),
    ({"cluster": {"tensor_transport": "accelerator", "data_plane": "compiled_graph"}},
     "pools.attention.resources.num_gpus is 0"),
    ({"cluster": {"tensor_transport": "accelerator", "data_plane": "remote_calls"}},
     "tensor_transport: accelerator needs cluster.data_plane: compiled_graph, got remote_calls"),
    ({"cluster": {"tensor_transport": "shm"}}, "tensor_transport: shm needs cluster.data_plane: "
                                               "compiled_graph, got sockets"),
    ({"cluster": {"tensor_transport": "accelerator", "data_plane": "compiled_graph"}, "pools": {
        "attention": {"resources": {"num_gpus": 1}}, "deltanet": {"resources": {"num_gpus": 1}},
        "experts": {"resources": {"num_gpus": 0.5}}}}, "pools.experts.resources.num_gpus is 0.5"),
])
def test_tensor_transport_errors_name_the_key(args, message):
    with pytest.raises(NextserveConfigError, match=message.replace(".", r"\.")):
        config = NextserveConfig.from_args(args)
        check_transport(config, resolve_placement(config.pools, NEXT))


def test_accelerator_transport_with_a_gpu_per_actor_is_accepted():
    gpu = {"resources": {"num_gpus": 1}}
    config = NextserveConfig.from_args({"cluster": {"tensor_transport": "accelerator",
                                                    "data_plane": "compiled_graph"},
                                        "pools": {"attention": gpu, "experts": gpu}})
    check_transport(config, resolve_placement(config.pools, MOE))  # the deltanet pool is unused here


def test_the_80b_example_config_places_qwen3_next_80b_on_gpus():
    config = NextserveConfig.from_yaml(ROOT / "examples" / "ray_config.qwen3-next-80b.yaml")
    shape = {**TINY_NEXT, "num_hidden_layers": 48, "num_experts": 512, "num_experts_per_tok": 10,
             "mlp_only_layers": [], "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 12}
    model = ModelConfig.from_hf({**shape, "architectures": ["Qwen3NextForCausalLM"]})
    p = resolve_placement(config.pools, model)
    assert [m.name for m in p.mixers] == ["attention-0", "deltanet-0"] and p.num_shards == 6
    assert p.mixers[0].layers == tuple(range(3, 48, 4))
    check_transport(config, p)  # accelerator: a whole GPU per actor
    gpu_node = {"CPU": 64.0, "GPU": 8.0, "memory": 1e12}
    check_resources(config.pools, p, [gpu_node, gpu_node])


def test_config_is_frozen():
    config = NextserveConfig()
    with pytest.raises(Exception, match="frozen"):
        config.pools.experts.actors = 3


def test_micro_batches_split_whole_sequences_and_logits_come_back_in_order():
    step = StepInput(tuple(range(12)), (4, 0, 2, 1), (0, 3, 0, 9), (5, 1, 5, 1), (4, 11, 5, 10, 0))
    split = split_step(step, min_tokens=8)
    a, b = split.parts
    assert (a.slots, a.lengths, a.logits_index) == ((4, 0), (5, 1), (4, 5, 0))
    assert (b.slots, b.token_ids, b.logits_index) == ((2, 1), tuple(range(6, 12)), (5, 4))
    fake = [torch.tensor([[4.0], [5.0], [0.0]]), torch.tensor([[11.0], [10.0]])]
    assert join_logits(split, fake).flatten().tolist() == [4.0, 11.0, 5.0, 10.0, 0.0]
    assert split_step(step, min_tokens=13).parts == (step, None)
    assert split_step(step, min_tokens=0).parts == (step, None)
