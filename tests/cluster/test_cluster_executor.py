"""The cluster executor against the local one: same logits for prefill, chunked prefill, decode and
mixed steps, slot reuse, both architectures, the sockets data plane (the default), the compiled
graph and plain remote calls, one lane and
two micro-batch lanes, redundant expert copies; and every actor reads only its own tensors.

Starts Ray: run inside a loopback-only network namespace,
    unshare -n sh -c 'ip link set lo up; exec .venv/bin/python -m pytest tests/cluster -q'"""

from __future__ import annotations

import pytest
import torch

ray = pytest.importorskip("ray")

from cluster.executor import ClusterExecutor, State  # noqa: E402
from deployments.config import NextserveConfig  # noqa: E402
from engine.config import NextserveConfigError  # noqa: E402
from engine.executor import StepInput  # noqa: E402
from engine.local_executor import LocalExecutor  # noqa: E402
from model.weights import CheckpointReader  # noqa: E402
from tests.ray_fixtures import ray_session_fixture  # noqa: E402

SLOTS, MAX_LEN = 4, 64


ray_session = ray_session_fixture(num_cpus=16)


def steps(seed: int = 0) -> list[StepInput]:
    """A request life cycle: prefill of three sequences, chunked prefill continuing beside decode,
    decode, and slot 1 reused by a new sequence (start 0) while the others decode."""
    g = torch.Generator().manual_seed(seed)

    def toks(n):
        return tuple(torch.randint(2, 384, (n,), generator=g).tolist())

    return [
        StepInput(toks(17), (0, 1, 2), (0, 0, 0), (7, 4, 6), (6, 10, 16)),  # prefill
        StepInput(toks(8), (0, 1, 2), (7, 4, 6), (1, 6, 1), (0, 6, 7)),  # decode + chunked prefill
        StepInput(toks(3), (0, 1, 2), (8, 10, 7), (1, 1, 1), (0, 1, 2)),  # decode
        StepInput(toks(1), (1,), (11,), (1,), (0,)),  # one decode
        StepInput(toks(11), (2, 1, 0), (8, 0, 9), (1, 9, 1), (0, 9, 10)),  # slot 1 reused, mixed
        StepInput(toks(2), (1, 3), (9, 0), (1, 1), (0, 1)),  # decode + a one-token prompt
    ]


def assert_same_logits(cluster: ClusterExecutor, local: LocalExecutor, seed: int = 0) -> None:
    for i, step in enumerate(steps(seed)):
        got, want = cluster.execute(step), local.execute(step)
        assert got.dtype == torch.float32 and got.shape == want.shape
        # Same math and order, except that the routed experts' sum is added shard by shard.
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()),
                                   msg=lambda m, i=i: f"step {i}: {m}")
        assert torch.equal(got.argmax(-1), want.argmax(-1))


def make(model_dir, **args) -> ClusterExecutor:
    return ClusterExecutor(model_dir, dtype="float32", num_slots=SLOTS, max_model_len=MAX_LEN,
                           config=NextserveConfig.from_args(args))


def local(model_dir) -> LocalExecutor:
    return LocalExecutor(model_dir, dtype="float32", num_slots=SLOTS, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def next_cluster(hf_next_dir):
    # 1 attention + 1 DeltaNet actor, 3 expert shards with expert 0 and 5 replicated; two lanes,
    # split from 8 tokens, so the prefill steps run as two micro-batches.
    ex = make(hf_next_dir, cluster={"micro_batch_tokens": 8},
              pools={"experts": {"actors": 3, "experts": [[0, 1, 2, 3], [4, 5, 6, 7], [0, 5]]}})
    yield ex
    ex.shutdown()


@pytest.fixture(scope="module")
def moe_cluster(hf_moe_dir):
    ex = make(hf_moe_dir, cluster={"micro_batch_tokens": 0},
              pools={"attention": {"actors": 2}, "experts": {"actors": 2}})
    yield ex
    ex.shutdown()


def test_qwen3_next_two_lanes_redundant_experts(next_cluster, hf_next_dir):
    assert next_cluster.num_lanes == 2 and next_cluster.placement.experts.copies(5) == (1, 2)
    assert_same_logits(next_cluster, local(hf_next_dir))


def test_qwen3_moe_one_lane(moe_cluster, hf_moe_dir):
    assert [m.name for m in moe_cluster.placement.mixers] == ["attention-0", "attention-1"]
    assert_same_logits(moe_cluster, local(hf_moe_dir), seed=1)


def test_step_telemetry_per_actor_and_router_bytes(next_cluster):
    """Every actor reports the time of its calls for the step; the router's bytes are exactly the
    rows it sent (hidden state, k expert ids and weights each) and the partial sums it got back."""
    c = next_cluster.config
    next_cluster.take_step_telemetry()
    prefill = steps()[0]  # 17 tokens: two micro-batch lanes
    next_cluster.execute(prefill)
    (t,) = next_cluster.take_step_telemetry()
    names = next_cluster.actor_names()
    assert len(t.actor_seconds) == len(names)  # one entry per actor, both lanes added up
    assert sorted(kind for kind, _ in t.actor_seconds) == sorted(n.rsplit("-", 1)[0] for n in names)
    assert all(0 < s < 60 for _, s in t.actor_seconds)
    # combine: rows × H float32; dispatch: the same rows × (H float32 + k int64 ids + k float32 weights)
    rows, rem = divmod(t.combine_bytes, c.hidden_size * 4)
    assert rem == 0 and t.dispatch_bytes == rows * (c.hidden_size * 4 + c.num_experts_per_tok * 12)
    T, moe_layers = len(prefill.token_ids), len(c.moe_layers)
    # each token goes to at least one and at most min(k, shards) shards per MoE layer
    assert T * moe_layers <= rows <= T * moe_layers * min(c.num_experts_per_tok, 3)
    next_cluster.execute(steps()[1])
    next_cluster.execute(steps()[2])
    assert len(next_cluster.take_step_telemetry()) == 2 and next_cluster.take_step_telemetry() == []


def test_torch_tensor_transport(hf_next_dir):
    """`tensor_transport: shm`: torch tensors in the messages, every actor-to-actor edge typed with
    Ray's tensor transport; the code path of NCCL between GPUs, with shared memory for NCCL."""
    ex = make(hf_next_dir, cluster={"tensor_transport": "shm", "micro_batch_tokens": 8,
                                    "data_plane": "compiled_graph"},
              pools={"experts": {"actors": 2}})
    try:
        assert_same_logits(ex, local(hf_next_dir), seed=3)
        (t,) = ex.take_step_telemetry()[-1:]
        assert t.combine_bytes > 0 and t.dispatch_bytes > t.combine_bytes
        with pytest.raises(NextserveConfigError, match=r"tensor_transport: shm needs cluster\.data_plane"):
            ex.configure_step(data_plane="sockets")  # refused before the graph is touched
        assert ex.state is State.RUNNING
        ex.configure_step(data_plane="remote_calls")  # plain calls pass the tensors by the object store
        assert_same_logits(ex, local(hf_next_dir), seed=4)
    finally:
        ex.shutdown()


def test_idle_tears_the_graph_down_and_the_next_step_compiles_it(moe_cluster, hf_moe_dir):
    assert moe_cluster.idle_after_s is None  # sockets burn nothing while idle: nothing to release
    moe_cluster.configure_step(data_plane="compiled_graph")
    assert moe_cluster.idle_after_s == 30.0  # cluster.idle_release_s
    ref = local(hf_moe_dir)
    life = steps(seed=5)
    for i, step in enumerate(life):
        if i == 3:  # mid-way, sequences cached: the pause must keep every cache
            moe_cluster.idle()
            assert moe_cluster.state is State.PARKED
            moe_cluster.idle()  # idle again: nothing to do
        got, want = moe_cluster.execute(step), ref.execute(step)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    assert moe_cluster.state is State.RUNNING
    moe_cluster.configure_step(data_plane="sockets")
    moe_cluster.idle()  # not a compiled graph: stays as it is
    assert moe_cluster.state is State.RUNNING


def test_plain_remote_calls_fallback(moe_cluster, hf_moe_dir):
    moe_cluster.configure_step(data_plane="remote_calls", micro_batch_tokens=8)
    try:
        assert_same_logits(moe_cluster, local(hf_moe_dir), seed=2)
    finally:
        moe_cluster.configure_step(data_plane="sockets", micro_batch_tokens=0)


def expected_tensors(names: set[str], config, spec=None, experts=None) -> set[str]:
    if spec is not None:
        own = {n for n in names if any(n.startswith(f"model.layers.{i}.") for i in spec.layers)
               and ".mlp.experts." not in n}
        if spec.embeds:
            own.add("model.embed_tokens.weight")
        if spec.has_head:
            own |= {"model.norm.weight", "model.embed_tokens.weight" if config.tie_word_embeddings
                    else "lm_head.weight"}
        return own
    return {f"model.layers.{layer}.mlp.experts.{e}.{p}.weight" for layer in config.moe_layers
            for e in experts for p in ("gate_proj", "up_proj", "down_proj")}


@pytest.mark.parametrize("which", ["next", "moe"])
def test_each_actor_reads_only_its_tensors(which, request):
    ex = request.getfixturevalue(f"{which}_cluster")
    names = CheckpointReader(ex.model_dir).names()
    accessed = ex.accessed_tensors()
    for spec in ex.placement.mixers:
        got = accessed[spec.name]
        assert len(got) == len(set(got)), f"{spec.name} read a tensor twice"
        assert set(got) == expected_tensors(names, ex.config, spec=spec), spec.name
    for s, held in enumerate(ex.placement.experts.shards):
        assert set(accessed[f"experts-{s}"]) == expected_tensors(names, ex.config, experts=held)
    everything = set().union(*map(set, accessed.values()))
    assert everything == {n for n in names if not n.startswith("mtp.")}
    # the graph is rebuilt after the pause: steps still run
    assert ex.execute(StepInput((5, 6), (3,), (0,), (2,), (1,))).shape == (1, ex.config.vocab_size)


def test_other_placement_same_logits(hf_moe_dir):
    """One attention actor for every layer, expert 7 on both shards."""
    ex = make(hf_moe_dir, cluster={"micro_batch_tokens": 0}, pools={
        "attention": {"actors": 1}, "experts": {"actors": 2, "experts": [[0, 1, 2, 3, 7], [4, 5, 6, 7]]}})
    try:
        assert [m.layers for m in ex.placement.mixers] == [(0, 1, 2, 3)]
        assert ex.expert_placement.copies(7) == (0, 1)
        assert_same_logits(ex, local(hf_moe_dir), seed=3)
    finally:
        ex.shutdown()
    assert ex.state is State.SHUT_DOWN and not ex.healthy()


def test_all_rows_dispatch_on_every_data_plane(tmp_path):
    """The built-in tiny model (16 experts top-4) on 2 shards: each shard gets every row
    (router/dispatch.py all_rows), one ShardWork for both; same logits and pairs per expert as the
    local executor over sockets, the compiled graph and plain calls, one lane and two, and with
    torch tensors over Ray's tensor transport (shm)."""
    from model.tiny import make_tiny_model
    from router.dispatch import Router

    d = make_tiny_model(tmp_path / "tiny")
    ex = make(d, cluster={"micro_batch_tokens": 0}, pools={"experts": {"actors": 2}})
    try:
        assert Router(ex.expert_placement, ex.config.num_experts_per_tok).all_rows
        for seed, plane, lanes in ((0, "sockets", 0), (1, "compiled_graph", 8), (2, "remote_calls", 0)):
            ex.configure_step(data_plane=plane, micro_batch_tokens=lanes)
            ref = local(d)
            ex.take_expert_counts()
            assert_same_logits(ex, ref, seed=seed)
            assert ex.take_expert_counts() == ref.take_expert_counts(), plane
    finally:
        ex.shutdown()
    # torch tensors by Ray's tensor transport: both shards' edges carry the same tensors
    ex = make(d, cluster={"tensor_transport": "shm", "micro_batch_tokens": 8, "data_plane": "compiled_graph"},
              pools={"experts": {"actors": 2}})
    try:
        assert_same_logits(ex, local(d), seed=3)
    finally:
        ex.shutdown()


def test_structured_outputs_through_the_cluster_executor(tmp_path):
    """The grammar masks are the engine's (its sampler), so they hold with the cluster executor too."""
    import json
    import re

    from engine.llm_engine import LLMEngine
    from engine.sampling import SamplingParams
    from engine.structured_output import StructuredOutputsParams
    from engine.tokenizer import Tokenizer
    from model.tiny import make_tiny_model

    d = make_tiny_model(tmp_path / "tiny")
    ex = make(d, cluster={"micro_batch_tokens": 0}, pools={"experts": {"actors": 2}})
    try:
        tok = Tokenizer(d)
        engine = LLMEngine(ex, tokenizer=tok)
        prompt = tok.encode("<|im_start|>user\nA code?<|im_end|>\n<|im_start|>assistant\n")
        specs = [StructuredOutputsParams(regex="[a-z]{3}-[0-9]{2}"),
                 StructuredOutputsParams(choice=("yes", "no")),
                 StructuredOutputsParams(json={"type": "object", "properties": {"n": {"type": "integer"}},
                                               "required": ["n"]}, disable_any_whitespace=True)]
        params = [SamplingParams(temperature=1.0, seed=i, max_tokens=40, structured_outputs=s)
                  for i, s in enumerate(specs)]
        code, answer, obj = engine.generate([prompt] * 3, params)
        assert re.fullmatch("[a-z]{3}-[0-9]{2}", code.text) and answer.text in ("yes", "no")
        if obj.finish_reason == "stop":  # a random model may write digits until max_tokens
            assert isinstance(json.loads(obj.text)["n"], int)
    finally:
        ex.shutdown()
