"""HTTP boundary: an ASGI middleware that counts requests by route and status class and failed
requests by kind, and the bodies of `GET /metrics`, `GET /dashboard` (a page written by hand,
no CDN) and its JSON feed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from monitoring.engine_metrics import EngineMetrics
from monitoring.sink import MetricsSink, process_sink

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]
STATIC = Path(__file__).resolve().parent / "static"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Routes get their own label value; anything else is "other", so a scanner cannot grow the series.
DEFAULT_ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/stats",
                  "/metrics", "/dashboard", "/dashboard/data", "/expert_load")


def error_kind(status: int) -> str | None:
    """The error kind a status is counted as (definitions.ERROR_KINDS); None for success."""
    if status < 400:
        return None
    kinds = {400: "bad_request", 401: "unauthorized", 403: "unauthorized", 404: "not_found", 408: "timeout",
             413: "too_large", 422: "bad_request", 429: "queue_full", 503: "unavailable", 504: "timeout"}
    return kinds.get(status, "bad_request" if status < 500 else "internal")


class MetricsMiddleware:
    def __init__(self, app: ASGIApp, sink: MetricsSink | Callable[[], MetricsSink] = process_sink,
                 routes: Iterable[str] = DEFAULT_ROUTES,
                 status_of: Callable[[Exception], int] | None = None) -> None:
        """`sink` may be a function, called at the first request: the app is built at import,
        before the process is connected to Ray, and the sink exports through Ray once it is.
        `status_of`: the status the app's exception handlers answer an exception with; they run
        outside every middleware (Starlette's ServerErrorMiddleware), so this one sees the raise."""
        self.app, self._sink, self.routes = app, sink, frozenset(routes)
        self.status_of = status_of

    @property
    def sink(self) -> MetricsSink:
        if not isinstance(self._sink, MetricsSink):
            self._sink = self._sink()
        return self._sink

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        route = path if path in self.routes else "other"
        status = 500

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except asyncio.CancelledError:  # the client went away mid-request
            self._count(route, "cancelled", "client_disconnect")
            raise
        except Exception as e:
            status = self.status_of(e) if self.status_of is not None else 500
            self._count(route, f"{status // 100}xx", error_kind(status))
            raise
        self._count(route, f"{status // 100}xx", error_kind(status))

    def _count(self, route: str, status: str, kind: str | None) -> None:
        if kind is not None:
            self.sink.inc("nextserve_request_errors", kind=kind)
        self.sink.inc("nextserve_http_requests", route=route, status=status)

def dashboard_page() -> bytes:
    return (STATIC / "dashboard.html").read_bytes()


def static_asset(name: str) -> tuple[bytes, str] | None:
    """A vendored asset of the dashboard by file name, with its content type; None if unknown."""
    types = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}
    path = STATIC / name
    if path.suffix not in types or path.parent != STATIC or not path.is_file():
        return None
    return path.read_bytes(), types[path.suffix]


def dashboard_data(sink: MetricsSink, engine: EngineMetrics | None) -> dict[str, Any]:
    """What the page polls: cumulative counters and histogram buckets (the page turns them into
    rates and percentiles over its own window), gauges, and the expert load."""
    v = sink.value
    return {
        "counters": {"prompt_tokens": v("nextserve_prompt_tokens"),
                     "generation_tokens": v("nextserve_generation_tokens"),
                     "engine_steps": v("nextserve_engine_steps"),
                     "prefix_cache_queried_tokens": v("nextserve_prefix_cache_queried_tokens"),
                     "prefix_cache_hit_tokens": v("nextserve_prefix_cache_hit_tokens")},
        "gauges": {"requests_running": v("nextserve_requests_running"),
                   "requests_waiting": v("nextserve_requests_waiting"),
                   "slots_used": v("nextserve_slots_used"), "slots_total": v("nextserve_slots_total"),
                   "active_params_ratio": v("nextserve_moe_active_params_ratio"),
                   "prefix_cache_states": v("nextserve_prefix_cache_states"),
                   "prefix_cache_state_entries": v("nextserve_prefix_cache_state_entries")},
        # JSON has no infinity: the last bucket's bound is null.
        "histograms": {name: [(None if le == float("inf") else le, n)
                              for le, n in sink.histogram(f"nextserve_{name}")] for name in
                       ("time_to_first_token_seconds", "time_per_output_token_seconds",
                        "e2e_request_latency_seconds")},
        "expert_load": engine.expert_load_json() if engine is not None else None,
    }
