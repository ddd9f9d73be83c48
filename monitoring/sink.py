"""Where recorded values go: a prometheus_client registry owned by this process (what the
ingress's `GET /metrics` shows) and, inside a Ray worker, Ray's metrics API.

Why both. A cluster spreads the work over processes on many nodes (engine replicas, mixer and
expert-shard actors), and Serve's proxy sends a scrape of `GET /metrics` to whichever replica it
picks, so no single HTTP endpoint sees the cluster. Ray already solves this: `ray.util.metrics`
values go to the metrics agent of the worker's node, each node exports them on its metrics
export port, and the head writes Prometheus's file-based service discovery list of those ports
(/tmp/ray/prom_metrics_service_discovery.json), so one Prometheus job finds every node as the
cluster grows and shrinks (monitoring/prometheus.yml). Ray prefixes the names: `ray_nextserve_*`,
and the dashboards and rules query those. The local registry costs little and gives an operator a
replica's view with no Ray agent in between (and the tests a value the moment it is recorded)."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from monitoring.definitions import METRICS, MetricDef

log = logging.getLogger(__name__)


class MetricsSink:
    """Records the metrics of definitions.METRICS by name; `labels` must be exactly the metric's."""

    def __init__(self, registry: CollectorRegistry | None = None, ray_export: bool | None = None,
                 defs: Iterable[MetricDef] = METRICS) -> None:
        """`ray_export` None: export through Ray when this process is connected to Ray."""
        self.registry = registry or CollectorRegistry()
        self.defs = {d.name: d for d in defs}
        self._local: dict[str, Any] = {d.name: _local_metric(d, self.registry) for d in self.defs.values()}
        self._ray_export = ray_export
        self._ray: dict[str, Any] | None = None
        self._zero_counters()

    def inc(self, name: str, value: float = 1.0, **labels: str) -> None:
        if value <= 0:  # Ray refuses non-positive increments; a zero changes nothing anyway
            return
        self._metric(name, labels).inc(value)
        if (r := self._ray_metric(name)) is not None:
            r.inc(value, tags=labels or None)

    def set(self, name: str, value: float, **labels: str) -> None:
        self._metric(name, labels).set(value)
        if (r := self._ray_metric(name)) is not None:
            r.set(value, tags=labels or None)

    def observe(self, name: str, value: float, **labels: str) -> None:
        self._metric(name, labels).observe(value)
        if (r := self._ray_metric(name)) is not None:
            r.observe(value, tags=labels or None)

    def render(self) -> bytes:
        """This process's metrics in Prometheus's text format."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float:
        """A counter's or gauge's current value in this process (0 if never recorded)."""
        got = self.registry.get_sample_value(self.defs[name].local_name, labels or None)
        return 0.0 if got is None else got

    def histogram(self, name: str, **labels: str) -> list[tuple[float, float]]:
        """A histogram's cumulative (upper bound, count) pairs, +Inf last."""
        d = self.defs[name]
        return [(le, self.registry.get_sample_value(f"{d.name}_bucket", {**labels, "le": _le(le)}) or 0.0)
                for le in (*d.buckets, float("inf"))]

    # -- helpers -----------------------------------------------------------------------------
    def _zero_counters(self) -> None:
        """Counters whose label values are all known exist from the start, at 0."""
        for d in self.defs.values():
            if d.kind != "counter" or len(d.values) != len(d.labels):
                continue
            names = [k for k, _ in d.values]
            for combo in itertools.product(*(v for _, v in d.values)):
                labels = dict(zip(names, combo, strict=True))
                self._metric(d.name, labels)  # prometheus_client: a child at 0
                if (r := self._ray_metric(d.name)) is not None:
                    # Ray's public inc() refuses 0; _record is what it calls after that check.
                    getattr(r, "_record", lambda *a, **k: None)(0.0, tags=labels or None)

    def _metric(self, name: str, labels: dict[str, str]) -> Any:
        d = self.defs[name]
        if set(labels) != set(d.labels):
            raise ValueError(f"{name} takes labels {d.labels}, got {tuple(labels)}")
        m = self._local[name]
        return m.labels(**labels) if labels else m

    def _ray_metric(self, name: str) -> Any | None:
        if self._ray is None:
            self._ray = _ray_metrics(self.defs.values()) if self._wants_ray() else {}
        return self._ray.get(name)

    def _wants_ray(self) -> bool:
        if self._ray_export is not None:
            return self._ray_export
        try:
            import ray
        except ImportError:
            return False
        return ray.is_initialized()


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(float(bound))


def _local_metric(d: MetricDef, registry: CollectorRegistry) -> Any:
    if d.kind == "counter":
        return Counter(d.name, d.help, d.labels, registry=registry)
    if d.kind == "gauge":
        return Gauge(d.name, d.help, d.labels, registry=registry)
    return Histogram(d.name, d.help, d.labels, buckets=d.buckets, registry=registry)


def _ray_metrics(defs: Iterable[MetricDef]) -> dict[str, Any]:
    """Ray's counterparts, made lazily: importing ray.util.metrics needs a connected worker."""
    try:
        from ray.util import metrics as rm
    except ImportError:
        return {}
    out: dict[str, Any] = {}
    for d in defs:
        if d.kind == "counter":
            out[d.name] = rm.Counter(d.name, d.help, tag_keys=d.labels)
        elif d.kind == "gauge":
            out[d.name] = rm.Gauge(d.name, d.help, tag_keys=d.labels)
        else:
            out[d.name] = rm.Histogram(d.name, d.help, boundaries=list(d.buckets), tag_keys=d.labels)
    return out



_process_sink: MetricsSink | None = None


def process_sink() -> MetricsSink:
    """This process's sink, made on first use. One per process on purpose, as Prometheus's own
    default registry: a Serve replica is one process, and its HTTP middleware (made when the app
    module is imported, before Ray connects) and its engine must write to the same registry."""
    global _process_sink
    if _process_sink is None:
        _process_sink = MetricsSink()
    return _process_sink
