"""The engine's step hook: after each step the engine hands over its stats snapshot (cumulative
counters, queue lengths, slots), how long the step took and the gate's per-expert counts; this
turns them into metrics. Structural types only: monitoring imports nothing of engine/."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Protocol

from monitoring.expert_load import ExpertLoad
from monitoring.sink import MetricsSink


class StatsLike(Protocol):
    """What the hook reads of engine.llm_engine.EngineStats."""

    num_running: int
    num_waiting: int
    num_slots_used: int
    num_slots: int
    num_steps: int
    num_prompt_tokens: int
    num_generated_tokens: int
    last_step_num_tokens: int
    last_step_num_seqs: int
    num_preemptions: int
    num_kv_blocks_used: int
    num_kv_blocks: int
    prefix_cache_queried_tokens: int
    prefix_cache_hit_tokens: int
    prefix_cache_block_evictions: int
    prefix_cache_states: int
    prefix_cache_state_entries: int
    prefix_cache_state_bytes: int
    prefix_cache_state_evictions: int
    spec_decode_num_drafts: int
    spec_decode_num_draft_tokens: int
    spec_decode_num_accepted_tokens: int
    spec_decode_accepted_per_pos: tuple[int, ...]


class TelemetryLike(Protocol):
    """What record_telemetry reads of engine.executor.StepTelemetry."""

    actor_seconds: tuple[tuple[str, float], ...]
    dispatch_bytes: int
    combine_bytes: int


_COUNTERS = (("num_prompt_tokens", "nextserve_prompt_tokens"),
             ("num_generated_tokens", "nextserve_generation_tokens"),
             ("num_steps", "nextserve_engine_steps"),
             ("num_preemptions", "nextserve_preemptions"),
             ("prefix_cache_queried_tokens", "nextserve_prefix_cache_queried_tokens"),
             ("prefix_cache_hit_tokens", "nextserve_prefix_cache_hit_tokens"),
             ("spec_decode_num_drafts", "nextserve_spec_decode_num_drafts"),
             ("spec_decode_num_draft_tokens", "nextserve_spec_decode_num_draft_tokens"),
             ("spec_decode_num_accepted_tokens", "nextserve_spec_decode_num_accepted_tokens"))
_EVICTIONS = (("prefix_cache_block_evictions", "block"), ("prefix_cache_state_evictions", "state"))


class EngineMetrics:
    def __init__(self, sink: MetricsSink, expert_load: ExpertLoad | None = None,
                 active_params_ratio: float | None = None) -> None:
        self.sink, self.expert_load = sink, expert_load
        self._last: dict[str, int] = {}
        # The engine thread records, HTTP handlers read the expert load: one lock between them.
        self.lock = threading.Lock()
        if active_params_ratio is not None:
            sink.set("nextserve_moe_active_params_ratio", active_params_ratio)

    def on_step(self, stats: StatsLike, step_seconds: float,
                expert_counts: Mapping[int, Sequence[int]] | None = None) -> None:
        s = self.sink
        for field, name in _COUNTERS:  # the engine keeps totals; the counters take the increase
            now = getattr(stats, field)
            s.inc(name, now - self._last.get(field, 0))
            self._last[field] = now
        for pos, now in enumerate(stats.spec_decode_accepted_per_pos):
            key = f"spec_decode_accepted_per_pos.{pos}"
            s.inc("nextserve_spec_decode_num_accepted_tokens_per_pos", now - self._last.get(key, 0),
                  position=str(pos))
            self._last[key] = now
        for field, what in _EVICTIONS:
            now = getattr(stats, field)
            s.inc("nextserve_prefix_cache_evictions", now - self._last.get(field, 0), what=what)
            self._last[field] = now
        s.set("nextserve_prefix_cache_states", stats.prefix_cache_states)
        s.set("nextserve_prefix_cache_state_entries", stats.prefix_cache_state_entries)
        s.set("nextserve_prefix_cache_state_bytes", stats.prefix_cache_state_bytes)
        s.set("nextserve_requests_running", stats.num_running)
        s.set("nextserve_requests_waiting", stats.num_waiting)
        s.set("nextserve_slots_used", stats.num_slots_used)
        s.set("nextserve_slots_total", stats.num_slots)
        s.set("nextserve_kv_blocks_used", stats.num_kv_blocks_used)
        s.set("nextserve_kv_blocks_total", stats.num_kv_blocks)
        s.set("nextserve_step_tokens", stats.last_step_num_tokens)
        s.observe("nextserve_actor_step_seconds", step_seconds, kind="engine")
        decode = 0 < stats.last_step_num_tokens == stats.last_step_num_seqs
        s.observe("nextserve_engine_step_seconds", step_seconds, phase="decode" if decode else "mixed")
        if expert_counts and self.expert_load is not None:
            self.record_routing(expert_counts)

    def record_routing(self, expert_counts: Mapping[int, Sequence[int]]) -> None:
        if self.expert_load is None:
            return
        with self.lock:
            steps = self.expert_load.record(expert_counts)
        for st in steps:
            layer = str(st.layer)
            self.sink.set("nextserve_moe_active_experts_ratio", st.active_ratio, layer=layer)
            self.sink.set("nextserve_moe_load_imbalance", st.imbalance, layer=layer)
            for shard, n in enumerate(st.per_shard):
                self.sink.inc("nextserve_moe_routed_tokens", n, layer=layer, shard=str(shard))

    def record_telemetry(self, steps: Iterable[TelemetryLike]) -> None:
        """A distributed executor's steps (engine.executor.StepTelemetry): one observation per actor
        per step under its kind, and the router's bytes."""
        for t in steps:
            for kind, seconds in t.actor_seconds:
                self.sink.observe("nextserve_actor_step_seconds", seconds, kind=kind)
            self.sink.inc("nextserve_router_bytes", t.dispatch_bytes, direction="dispatch")
            self.sink.inc("nextserve_router_bytes", t.combine_bytes, direction="combine")

    def expert_load_json(self) -> dict:
        if self.expert_load is None:
            return {"num_experts": 0, "num_steps": 0, "shards": [], "layers": [], "counts": [],
                    "shard_counts": [], "last_step": []}
        with self.lock:
            return self.expert_load.to_json()
