"""Every nextserve metric, defined once: name, kind, help text, label names and buckets. Labels
take values from small fixed sets (layer, shard, actor kind, error kind), never request ids or
expert ids, so a cluster's series count stays bounded; per-expert counts go to the JSON endpoint.

Names are those of the ingress's own `GET /metrics`; through Ray's metrics pipeline each one is
exported with Ray's prefix, `ray_<name>` (and counters as `ray_<name>_total`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Kind = Literal["counter", "gauge", "histogram"]

# Seconds; TTFT and end-to-end span a CPU test model (ms) to a loaded 80B cluster (tens of s).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TOKEN_TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.5)
STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)

ACTOR_KINDS = ("engine", "attention", "deltanet", "experts")
# What a failed request is counted as; HTTP statuses map onto these (monitoring/http.py).
ERROR_KINDS = ("bad_request", "unauthorized", "too_large", "not_found", "queue_full", "unavailable",
               "timeout", "internal", "client_disconnect")
FINISH_REASONS = ("stop", "length", "abort", "error")


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # The fixed values of a label, where it has them: such series are made at 0 on start, so that
    # rate() and alerts see them before the first event.
    values: tuple[tuple[str, tuple[str, ...]], ...] = ()

    @property
    def ray_name(self) -> str:
        """The series name once exported through Ray's metrics agent."""
        return f"ray_{self.name}_total" if self.kind == "counter" else f"ray_{self.name}"

    @property
    def local_name(self) -> str:
        """The series name in prometheus_client's text format (counters gain `_total`)."""
        return f"{self.name}_total" if self.kind == "counter" else self.name


def _m(name: str, kind: Kind, help: str, labels: tuple[str, ...] = (), buckets: tuple[float, ...] = (),
       values: dict[str, tuple[str, ...]] | None = None) -> MetricDef:
    return MetricDef(f"nextserve_{name}", kind, help, labels, buckets, tuple((values or {}).items()))


METRICS: tuple[MetricDef, ...] = (
    # -- throughput and latency (engine stats hook, request boundary) ----------------------------
    _m("prompt_tokens", "counter", "Prompt tokens computed (prefill)."),
    _m("generation_tokens", "counter", "Output tokens sampled."),
    _m("engine_steps", "counter", "Engine steps run."),
    _m("engine_step_seconds", "histogram", "Time of one whole engine step, by phase (decode: every "
                                           "sequence in it computed one token; mixed: it prefilled "
                                           "prompt chunks or verified draft tokens too).", ("phase",),
       STEP_BUCKETS, values={"phase": ("decode", "mixed")}),
    _m("requests_finished", "counter", "Requests finished, by reason.", ("reason",),
       values={"reason": FINISH_REASONS}),
    _m("requests_running", "gauge", "Requests holding a sequence slot."),
    _m("requests_waiting", "gauge", "Requests queued for a slot."),
    _m("slots_used", "gauge", "Sequence slots (KV cache / DeltaNet state) in use."),
    _m("slots_total", "gauge", "Sequence slots the executor has."),
    _m("preemptions", "counter", "Running requests preempted for want of KV-cache blocks: they give "
                                 "back their slot and blocks and are recomputed (prefilled again) later."),
    _m("kv_blocks_used", "gauge", "KV-cache blocks held by running requests (per attention layer)."),
    _m("kv_blocks_total", "gauge", "KV-cache blocks the executor has per attention layer (0: the model "
                                   "has no attention layers, so blocks are not counted)."),
    # -- prefix caching (engine stats hook) --------------------------------------------------------
    _m("prefix_cache_queried_tokens", "counter", "Tokens of admitted requests looked up in the prefix "
                                                 "cache (recomputed ones again)."),
    _m("prefix_cache_hit_tokens", "counter", "Of those, tokens found cached and not computed (their KV "
                                             "blocks, and the DeltaNet state at their end, reused)."),
    _m("prefix_cache_states", "gauge", "DeltaNet states saved for prefix caching, held now."),
    _m("prefix_cache_state_entries", "gauge", "DeltaNet states the executor can hold for prefix caching "
                                              "(engine.prefix_cache_states)."),
    _m("prefix_cache_state_bytes", "gauge", "Memory the executor holds for saved DeltaNet states."),
    _m("prefix_cache_evictions", "counter", "Prefix-cache entries evicted to make room, by what (block: a "
                                            "cached KV block reused for other tokens; state: a saved "
                                            "DeltaNet state).", ("what",),
       values={"what": ("block", "state")}),
    # -- speculative decoding (engine stats hook; vLLM's spec_decode_* metrics) -------------------
    _m("spec_decode_num_drafts", "counter", "Verify chunks: a sequence's draft tokens checked by one "
                                            "target step (engine.speculative_tokens)."),
    _m("spec_decode_num_draft_tokens", "counter", "Draft tokens the MTP layer proposed and a target step "
                                                  "verified."),
    _m("spec_decode_num_accepted_tokens", "counter", "Of those, draft tokens accepted (each saves a target "
                                                     "step)."),
    _m("spec_decode_num_accepted_tokens_per_pos", "counter", "Draft tokens accepted, by draft position "
                                                             "(0: the first draft); divided by "
                                                             "spec_decode_num_drafts, the acceptance "
                                                             "rate per position.", ("position",),
       values={"position": tuple(str(i) for i in range(8))}),  # engine.speculative_tokens <= 8
    _m("step_tokens", "gauge", "Tokens in the last engine step (prefill chunks + decodes)."),
    _m("time_to_first_token_seconds", "histogram", "From a request's arrival to its first output token.",
       buckets=LATENCY_BUCKETS),
    _m("time_per_output_token_seconds", "histogram", "Mean time between output tokens of a request "
                                                     "(after the first).", buckets=TOKEN_TIME_BUCKETS),
    _m("e2e_request_latency_seconds", "histogram", "From a request's arrival to its last token.",
       buckets=LATENCY_BUCKETS),
    # -- HTTP (middleware) -------------------------------------------------------------------------
    _m("http_requests", "counter", "HTTP requests answered, by route and status class.",
       ("route", "status")),
    _m("request_errors", "counter", "Requests that failed, by kind.", ("kind",),
       values={"kind": ERROR_KINDS}),
    # -- activation sparsity and expert load (the gate's routing result, per step) ----------------
    _m("moe_active_experts_ratio", "gauge", "Last step: distinct experts the gate chose / experts, "
                                            "per MoE layer.", ("layer",)),
    _m("moe_load_imbalance", "gauge", "Last step: max / mean (token, expert) pairs per expert, per "
                                      "MoE layer (1 = perfectly even).", ("layer",)),
    _m("moe_routed_tokens", "counter", "(token, expert) pairs routed, per MoE layer and expert shard.",
       ("layer", "shard")),
    _m("moe_active_params_ratio", "gauge", "Share of the model's parameters one token activates "
                                           "(top-k of the routed experts plus everything dense)."),
    # -- the cluster ---------------------------------------------------------------------------
    _m("actor_step_seconds", "histogram", "Time of one step's work, per actor kind (engine: the whole "
                                          "step; others: the actor's calls for one step).", ("kind",),
       STEP_BUCKETS),
    _m("router_bytes", "counter", "Bytes the token router moved, by direction (dispatch: hidden "
                                  "states to shards; combine: partial outputs back).", ("direction",),
       values={"direction": ("dispatch", "combine")}),
)

BY_NAME: dict[str, MetricDef] = {m.name: m for m in METRICS}


def series_names(d: MetricDef, ray: bool) -> tuple[str, ...]:
    """Every series name a metric produces in a scrape (histograms: _bucket, _count, _sum)."""
    base = d.ray_name if ray else d.local_name
    if d.kind == "histogram":
        return (f"{base}_bucket", f"{base}_count", f"{base}_sum")
    return (base,)
