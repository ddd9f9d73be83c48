"""The Serve deployment: an OpenAI-compatible FastAPI ingress that owns one engine replica.

Why one deployment and not ingress → engine over a DeploymentHandle: the engine replica is the
unit that scales (it holds the model or the cluster executor's actors), and the HTTP work around
it (tokenising, templating, JSON) is small next to a step, so a separate ingress tier would add a
hop per streamed token and a second autoscaler without relieving anything. Serve's proxy already
routes each request to the replica with the shortest queue, autoscaling reads ongoing requests
per replica, which is exactly engine load, and a client disconnect cancels the handler in the
replica that holds the request's slot — no cross-actor cancellation to get right. The engine is
a constructor argument (`engine_factory`) so tests can hand in a fake.

No `from __future__ import annotations` here: Serve pickles the ingress class by value, and
FastAPI must resolve the route annotations (the request models) in the replica."""


import dataclasses
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from deployments import chat_completions, completions
from deployments.config import NextserveConfig
from deployments.monitor import ReplicaMonitor
from deployments.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList, error_body
from deployments.serving import SSE_DONE, APIError, Engine, ServingContext, served_model_name, sse
from engine.async_engine import EngineStepError, QueueFullError, RequestTimeoutError
from engine.tokenizer import Tokenizer
from monitoring import http as monitoring_http

log = logging.getLogger(__name__)
EngineFactory = Callable[[NextserveConfig], tuple[Engine, Tokenizer, int]]  # engine, tokenizer, max_model_len

api = FastAPI(title="nextserve", docs_url=None, redoc_url=None)


def _error(status: int, message: str, param: str | None = None, retry_after_s: float | None = None,
           ) -> JSONResponse:
    headers = {"Retry-After": str(int(retry_after_s))} if retry_after_s is not None else None
    return JSONResponse(error_body(message, status, param), status_code=status, headers=headers)


def _as_error(e: Exception) -> JSONResponse:
    """Every exception a request can raise, as OpenAI's error form with its status."""
    if isinstance(e, APIError):
        return _error(e.status, e.message, e.param, e.retry_after_s)
    if isinstance(e, QueueFullError):
        return _error(429, str(e), retry_after_s=e.retry_after_s)
    if isinstance(e, RequestTimeoutError):
        return _error(504, str(e))
    if isinstance(e, EngineStepError):
        return _error(503, str(e), retry_after_s=1)
    if isinstance(e, ValueError):  # the engine refused the request (e.g. prompt too long)
        return _error(400, str(e), "prompt")
    log.exception("request failed")
    return _error(500, f"internal error: {type(e).__name__}: {e}")


# Counts requests by route and status, errors by kind; an exception is counted with the status
# _as_error answers it with.
api.add_middleware(monitoring_http.MetricsMiddleware, status_of=lambda e: _as_error(e).status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {first.get('msg')}")
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    return _error(400, f"{where}: {first.get('msg')} (got {first.get('input')!r})", param)


@api.exception_handler(HTTPException)
async def _http_error(_: Request, e: HTTPException) -> JSONResponse:
    # FastAPI's own refusals (an unknown route, a wrong method, a body it cannot parse, such as
    # JSON nested too deep for the parser) in OpenAI's error form too.
    detail = e.detail if isinstance(e.detail, str) else str(e.detail)
    return JSONResponse(error_body(detail, e.status_code), status_code=e.status_code, headers=e.headers)


@api.exception_handler(Exception)
async def _any_error(_: Request, e: Exception) -> JSONResponse:
    return _as_error(e)


async def _event_stream(events: AsyncIterator[str]) -> Response:
    """Wait for the first event before answering, so a refused request still gets its status;
    errors after that go into the stream, as OpenAI's do."""
    try:
        first = await anext(events)
    except Exception as e:
        await events.aclose()
        return _as_error(e)

    async def body() -> AsyncIterator[str]:
        try:
            yield first
            async for event in events:
                yield event
        except Exception as e:
            err = _as_error(e)
            yield sse(error_body(str(getattr(e, "message", e)), err.status_code))
            yield SSE_DONE
        finally:  # a client that left: aborting the request frees its slot now, not at GC
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream")


@serve.deployment(name="NextserveServer")
@serve.ingress(api)
class NextserveServer:
    def __init__(self, args: dict[str, Any], engine_factory: EngineFactory | None = None) -> None:
        from deployments.engine_factory import build_engine

        self.config = NextserveConfig.from_args(args)
        engine, tokenizer, max_model_len = (engine_factory or build_engine)(self.config)
        self.engine = engine
        self.monitor = ReplicaMonitor(engine, self.config)
        self.ctx = ServingContext(engine=self.monitor.engine, tokenizer=tokenizer,
                                  max_model_len=max_model_len,
                                  model_name=served_model_name(self.config))

    @api.get("/health")
    async def health(self) -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.ctx.model_name, created=0,
                                         max_model_len=self.ctx.max_model_len)])

    @api.get("/stats")
    async def stats(self) -> dict[str, int]:
        """The engine's counters and slot use (not part of the OpenAI API)."""
        return dataclasses.asdict(self.engine.stats())

    @api.get("/metrics")
    async def metrics(self) -> Response:
        """This replica's metrics in Prometheus's text format (the cluster's: Ray's metrics export)."""
        return Response(self.monitor.sink.render(), media_type=monitoring_http.PROMETHEUS_CONTENT_TYPE)

    @api.get("/expert_load")
    async def expert_load(self) -> dict:
        """Tokens routed per (MoE layer, expert) and per (layer, shard) since start, and the last step."""
        em = self.monitor.engine_metrics
        return em.expert_load_json() if em is not None else {}

    @api.post("/rebalance")
    async def rebalance(self) -> Response:
        """Ask this replica to rebalance its expert shards from the load seen since its last look
        (`nextserve rebalance`); it happens between two engine steps, at the next step."""
        from cluster.rebalance import find_policy

        policy = find_policy(self.engine)
        if policy is None:
            return _error(400, "expert rebalancing needs the cluster executor and a MoE model")
        policy.request()
        last = policy.last_result
        return JSONResponse({"scheduled": True, "replica": serve.get_replica_context().replica_id.unique_id,
                             "shards": [list(s) for s in policy.executor.placement.experts.shards],
                             "last_result": None if last is None else dataclasses.asdict(last)})

    @api.get("/dashboard")
    async def dashboard(self) -> HTMLResponse:
        return HTMLResponse(monitoring_http.dashboard_page())

    @api.get("/dashboard/data")
    async def dashboard_data(self) -> dict:
        return monitoring_http.dashboard_data(self.monitor.sink, self.monitor.engine_metrics)

    @api.get("/dashboard/{asset}")
    async def dashboard_asset(self, asset: str) -> Response:
        found = monitoring_http.static_asset(asset)
        if found is None:
            return _error(404, f"no dashboard asset {asset!r}")
        return Response(found[0], media_type=found[1])

    @api.post("/v1/completions")
    async def completions(self, req: CompletionRequest) -> Response:
        if req.stream:
            return await _event_stream(completions.stream(self.ctx, req))
        return JSONResponse((await completions.complete(self.ctx, req)).model_dump())

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: ChatCompletionRequest) -> Response:
        if req.stream:
            return await _event_stream(chat_completions.stream(self.ctx, req))
        return JSONResponse((await chat_completions.complete(self.ctx, req)).model_dump())

    def check_health(self) -> None:
        """Serve restarts a replica whose engine thread died."""
        alive = getattr(self.engine, "is_alive", None)
        if alive is not None and not alive():
            raise RuntimeError("the engine thread has stopped")

    def __del__(self) -> None:
        shutdown = getattr(getattr(self, "engine", None), "shutdown", None)
        if shutdown is not None:
            shutdown()

