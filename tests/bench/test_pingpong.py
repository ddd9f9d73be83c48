"""bench/pingpong.py's sleepy actors (no Ray): each call gives the real worker's result and takes
at least its profile's time for the call's tokens; and the profiles' arithmetic."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from bench.cost_model import h100_cost
from bench.pingpong import Profile, sleepy_classes
from cluster.config import Pools
from cluster.messages import StepMsg
from cluster.placement import resolve_placement
from cluster.workers import ExpertWorker, MixerWorker
from engine.executor import StepInput
from model.config import ModelConfig


def test_profiles():
    lin = Profile("linear", mixer_ms=8.0, expert_ms=4.0, ref_batch=32, fixed_share=0.25)
    assert lin.cost(32).deltanet_ms == pytest.approx(8.0)
    assert lin.cost(16).experts_ms == pytest.approx(4.0 * (0.25 + 0.75 / 2))
    h = Profile("h100-80b", dilate=100.0).cost(8)
    assert h.experts_ms == pytest.approx(100 * h100_cost(8).experts_ms)


def test_sleepy_workers_compute_the_real_result_and_take_the_profile_time(tmp_path):
    from model.tiny import make_tiny_model

    model_dir = str(make_tiny_model(tmp_path / "m"))
    c = ModelConfig.from_dir(model_dir, dtype="float32")
    placement = resolve_placement(Pools(), c)
    profile = Profile("linear", mixer_ms=40.0, expert_ms=30.0, ref_batch=4)
    sleepy_mixer, sleepy_shard = sleepy_classes(profile)
    spec = next(m for m in placement.mixers if 0 in m.layers)
    args = (model_dir, "float32", spec, 4, 64, placement.experts)
    msg = StepMsg(0, StepInput((5, 6, 7, 8), (0, 1), (0, 0), (2, 2), (1, 3)))
    plain, sleepy = MixerWorker(*args), sleepy_mixer(*args)
    want = plain.run(0, msg, None)
    t0 = time.perf_counter()
    got = sleepy.run(0, msg, None)
    assert time.perf_counter() - t0 >= 0.040  # 4 tokens at ref_batch 4: the whole 40 ms
    np.testing.assert_array_equal(got[0].h, want[0].h)
    # the sleep counts as the actor's time (all but the call's first µs, before it measures)
    assert got[0].telemetry.seconds[spec.name] >= 0.039
    assert sleepy.run(0, StepMsg(1, None), None) == plain.run(0, StepMsg(1, None), None)  # empty lane

    shard_args = (model_dir, "float32", 0, placement.experts.shards[0])
    work = want[1]
    t0 = time.perf_counter()
    result = sleepy_shard(*shard_args).run(work)
    n = work.x.shape[0]
    assert time.perf_counter() - t0 >= 0.030 * n / 4 and result.seconds >= 0.030 * n / 4
    torch.testing.assert_close(torch.from_numpy(result.partial),
                               torch.from_numpy(ExpertWorker(*shard_args).run(work).partial))
