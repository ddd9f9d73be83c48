"""The recorders write the metrics of definitions.METRICS: the engine step hook, the request
timer, the HTTP middleware; names and labels as the table says."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, fields

import pytest
from prometheus_client.parser import text_string_to_metric_families

from engine.executor import StepTelemetry
from engine.llm_engine import EngineStats
from monitoring.definitions import METRICS, series_names
from monitoring.engine_metrics import EngineMetrics
from monitoring.expert_load import ExpertLoad
from monitoring.http import MetricsMiddleware, dashboard_data, error_kind
from monitoring.requests import MeteredEngine, RequestTimer
from monitoring.sink import MetricsSink
from tests.monitoring.fakes import engine_stats


def sink() -> MetricsSink:
    return MetricsSink(ray_export=False)


def test_the_engine_stats_fake_fills_every_field():
    stats = engine_stats(num_slots=4, spec_decode_accepted_per_pos=(1, 2))
    assert stats.num_slots == 4 and stats.spec_decode_accepted_per_pos == (1, 2)
    assert all(getattr(stats, f.name) in (0, (), "") for f in fields(EngineStats)
               if f.name not in ("num_slots", "spec_decode_accepted_per_pos"))
    with pytest.raises(TypeError):
        engine_stats(num_slot=4)  # a misspelt field is not taken silently


def test_table_is_consistent():
    names = [m.name for m in METRICS]
    assert len(names) == len(set(names))
    for m in METRICS:
        assert m.name.startswith("nextserve_") and m.help
        assert (m.kind == "histogram") == bool(m.buckets)
        assert "request_id" not in m.labels and "expert" not in m.labels  # bounded label sets


def test_every_metric_is_exposed():
    s = sink()
    exposed = {smp.name for fam in text_string_to_metric_families(s.render().decode()) for smp in fam.samples}
    EngineMetrics(s, ExpertLoad(2)).on_step(engine_stats(num_steps=1), 0.01, {0: [1, 1]})
    exposed |= {smp.name for fam in text_string_to_metric_families(s.render().decode())
                for smp in fam.samples}
    # every unlabelled metric shows up at once; labelled ones once recorded
    for m in METRICS:
        if not m.labels:
            assert set(series_names(m, ray=False)) <= exposed, m.name


def test_engine_hook_takes_increases_and_gauges():
    s = sink()
    hook = EngineMetrics(s, ExpertLoad(4, [[0, 1], [2, 3]]), active_params_ratio=0.25)
    hook.on_step(engine_stats(num_steps=1, num_prompt_tokens=10, num_generated_tokens=2,
                              last_step_num_tokens=12, num_slots=4), 0.02, {0: [4, 0, 0, 0], 2: [1, 1, 1, 1]})
    hook.on_step(engine_stats(num_steps=2, num_prompt_tokens=10, num_generated_tokens=4, num_running=2,
                              last_step_num_tokens=2, last_step_num_seqs=2, num_slots=4), 0.01,
                 {0: [0, 2, 0, 0], 2: [0, 0, 0, 2]})
    assert s.value("nextserve_prompt_tokens") == 10
    assert s.value("nextserve_generation_tokens") == 4
    assert s.value("nextserve_engine_steps") == 2
    assert s.value("nextserve_requests_running") == 2 and s.value("nextserve_slots_total") == 4
    assert s.value("nextserve_moe_active_params_ratio") == 0.25
    assert s.value("nextserve_moe_active_experts_ratio", layer="0") == 0.25  # last step: expert 1 only
    assert s.value("nextserve_moe_load_imbalance", layer="2") == 2 / 0.5
    assert s.value("nextserve_moe_routed_tokens", layer="0", shard="0") == 6
    assert s.value("nextserve_moe_routed_tokens", layer="2", shard="1") == 4
    assert s.histogram("nextserve_actor_step_seconds", kind="engine")[-1] == (float("inf"), 2)
    # the first step prefilled 10 prompt tokens beside its decodes, the second only decoded
    assert s.histogram("nextserve_engine_step_seconds", phase="mixed")[-1] == (float("inf"), 1)
    assert dict(s.histogram("nextserve_engine_step_seconds", phase="decode"))[0.01] == 1
    assert hook.expert_load_json()["counts"] == [[4, 2, 0, 0], [1, 1, 1, 3]]


def test_cluster_telemetry_per_actor_kind_and_router_bytes():
    s = sink()
    actors = (("attention", 0.002), ("deltanet", 0.003), ("experts", 0.0004), ("experts", 0.02))
    steps = [StepTelemetry(actors, dispatch_bytes=1000, combine_bytes=600),
             StepTelemetry((("attention", 0.004),), dispatch_bytes=0, combine_bytes=0)]
    EngineMetrics(s).record_telemetry(steps)
    assert s.histogram("nextserve_actor_step_seconds", kind="attention")[-1] == (float("inf"), 2)
    experts = dict(s.histogram("nextserve_actor_step_seconds", kind="experts"))
    assert experts[0.0005] == 1 and experts[0.025] == 2  # cumulative buckets: one per shard
    assert s.value("nextserve_router_bytes", direction="dispatch") == 1000
    assert s.value("nextserve_router_bytes", direction="combine") == 600


def test_labels_are_checked():
    with pytest.raises(ValueError, match="takes labels"):
        sink().inc("nextserve_request_errors", kind="x", route="y")


def test_request_timer():
    t = iter([0.0, 0.5, 2.5])
    s = sink()
    timer = RequestTimer(s, clock=lambda: next(t))
    timer.on_tokens(1)  # first token at 0.5
    timer.on_tokens(4)
    timer.on_finish("length")  # at 2.5: 4 more tokens in 2 s
    timer.on_finish("abort")  # counted once
    assert s.value("nextserve_requests_finished", reason="length") == 1
    assert s.value("nextserve_requests_finished", reason="abort") == 0
    ttft = dict(s.histogram("nextserve_time_to_first_token_seconds"))
    assert ttft[0.25] == 0 and ttft[0.5] == 1
    tpot = dict(s.histogram("nextserve_time_per_output_token_seconds"))
    assert tpot[0.25] == 0 and tpot[0.5] == 1  # 0.5 s per token
    assert s.registry.get_sample_value("nextserve_e2e_request_latency_seconds_sum") == 2.5


@dataclass
class Out:
    new_token_ids: tuple
    finished: bool
    finish_reason: str | None


class FakeEngine:
    async def generate(self, request_id, prompt, params):
        yield Out((1,), False, None)
        yield Out((2,), True, "stop")

    def stats(self):
        return engine_stats()


def test_metered_engine():
    s = sink()
    eng = MeteredEngine(FakeEngine(), s)

    async def run():
        return [o async for o in eng.generate("r", [1], None)]

    assert len(asyncio.run(run())) == 2
    assert s.value("nextserve_requests_finished", reason="stop") == 1
    assert s.histogram("nextserve_e2e_request_latency_seconds")[-1][1] == 1
    assert eng.stats() == engine_stats()


def test_middleware_counts_routes_and_errors():
    s = sink()

    async def app(scope, receive, send):
        if scope["path"] == "/boom":
            raise RuntimeError("boom")
        status = 429 if scope["path"] == "/v1/completions" else 200
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    mw = MetricsMiddleware(app, s)

    async def call(path):
        async def send(_):
            pass
        await mw({"type": "http", "path": path}, None, send)

    asyncio.run(call("/v1/completions"))
    asyncio.run(call("/health"))
    asyncio.run(call("/some/scanner/path"))
    with pytest.raises(RuntimeError):
        asyncio.run(call("/boom"))
    assert s.value("nextserve_request_errors", kind="queue_full") == 1
    assert s.value("nextserve_request_errors", kind="internal") == 1
    assert s.value("nextserve_http_requests", route="/v1/completions", status="4xx") == 1
    assert s.value("nextserve_http_requests", route="other", status="2xx") == 1
    assert error_kind(200) is None and error_kind(503) == "unavailable" and error_kind(502) == "internal"


def test_dashboard_data_shape():
    s = sink()
    hook = EngineMetrics(s, ExpertLoad(2))
    hook.on_step(engine_stats(num_steps=1, num_generated_tokens=3), 0.01, {0: [2, 1]})
    d = dashboard_data(s, hook)
    assert d["counters"]["generation_tokens"] == 3
    assert d["expert_load"]["counts"] == [[2, 1]]
    assert d["histograms"]["time_to_first_token_seconds"][-1][0] is None
    json.dumps(d, allow_nan=False)  # what a JSON response must carry


def test_spec_decode_counters_take_increases_per_draft_position():
    s = sink()
    hook = EngineMetrics(s)
    hook.on_step(engine_stats(spec_decode_num_drafts=2, spec_decode_num_draft_tokens=6,
                              spec_decode_num_accepted_tokens=3,
                              spec_decode_accepted_per_pos=(2, 1, 0)), 0.01)
    hook.on_step(engine_stats(spec_decode_num_drafts=3, spec_decode_num_draft_tokens=9,
                              spec_decode_num_accepted_tokens=6,
                              spec_decode_accepted_per_pos=(3, 2, 1)), 0.01)
    assert s.value("nextserve_spec_decode_num_drafts") == 3
    assert s.value("nextserve_spec_decode_num_draft_tokens") == 9
    assert s.value("nextserve_spec_decode_num_accepted_tokens") == 6
    assert [s.value("nextserve_spec_decode_num_accepted_tokens_per_pos", position=str(p)) for p in range(3)] \
        == [3, 2, 1]
