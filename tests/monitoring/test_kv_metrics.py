"""The engine step hook records preemptions (the increase of the engine's total) and the KV-cache
block gauges; over a real engine whose small pool forces preemption."""

from __future__ import annotations

from engine.llm_engine import LLMEngine
from engine.sampling import SamplingParams
from monitoring.definitions import BY_NAME
from monitoring.engine_metrics import EngineMetrics
from monitoring.sink import MetricsSink
from tests.engine.fakes import PagedFakeExecutor
from tests.monitoring.fakes import engine_stats

PROMPTS = [[3, 4, 5, 6, 7, 8, 9], [10], [11, 12, 13, 14, 15], [16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26]]


def test_hook_takes_the_increase_of_preemptions_and_sets_block_gauges():
    s = MetricsSink(ray_export=False)
    hook = EngineMetrics(s)
    hook.on_step(engine_stats(num_steps=1, num_preemptions=2, num_kv_blocks_used=7, num_kv_blocks=10), 0.01)
    hook.on_step(engine_stats(num_steps=2, num_preemptions=5, num_kv_blocks_used=3, num_kv_blocks=10), 0.01)
    assert s.value("nextserve_preemptions") == 5
    assert s.value("nextserve_kv_blocks_used") == 3 and s.value("nextserve_kv_blocks_total") == 10
    assert "never preempts" not in BY_NAME["nextserve_preemptions"].help


def test_engine_preemptions_reach_the_counter():
    s = MetricsSink(ray_export=False)
    engine = LLMEngine(PagedFakeExecutor(num_kv_blocks=8, num_slots=4), max_num_batched_tokens=8)
    engine.step_hooks.append(EngineMetrics(s).on_step)
    used = []
    engine.step_hooks.append(lambda stats, seconds, counts: used.append(stats.num_kv_blocks_used))
    engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))
    assert engine.scheduler.num_preemptions > 0
    assert s.value("nextserve_preemptions") == engine.scheduler.num_preemptions
    assert s.value("nextserve_kv_blocks_total") == 8 and max(used) == 8
    assert s.value("nextserve_kv_blocks_used") == used[-1]
