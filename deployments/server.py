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
import json
import logging
import os
import re
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException

from deployments import chat_completions, completions, tokenization
from deployments.config import NextserveConfig
from deployments.monitor import ReplicaMonitor
from deployments.request_models import ChatCompletionRequest, CompletionRequest, DetokenizeRequest
from deployments.response_models import ModelCard, ModelList, error_body
from deployments.security import (
    AuthMiddleware,
    BodyLimitMiddleware,
    RebalanceGate,
    SecuritySettings,
    keep_replica_port_on_loopback,
    max_prompts_per_request,
)
from deployments.serving import SSE_DONE, APIError, Engine, ServingContext, new_id, served_model_name, sse
from engine.async_engine import EngineStepError, QueueFullError, RequestTimeoutError
from engine.tokenizer import Tokenizer
from monitoring import http as monitoring_http

log = logging.getLogger(__name__)
EngineFactory = Callable[[NextserveConfig], tuple[Engine, Tokenizer, int]]  # engine, tokenizer, max_model_len

api = FastAPI(title="nextserve", docs_url=None, redoc_url=None)


def _error(status: int, message: str, param: str | None = None, retry_after_s: float | None = None,
           request_id: str | None = None) -> JSONResponse:
    headers = {"Retry-After": str(int(retry_after_s))} if retry_after_s is not None else {}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return JSONResponse(error_body(message, status, param), status_code=status, headers=headers or None)


def _as_error(e: Exception) -> JSONResponse:
    """Every exception a request can raise, as OpenAI's error form with its status. Messages we
    wrote for clients pass through; anything else is logged with a request id, and the client
    gets that id, never the exception's text (it may hold paths, addresses, tracebacks)."""
    if isinstance(e, APIError):
        return _error(e.status, e.message, e.param, e.retry_after_s)
    if isinstance(e, QueueFullError):
        return _error(429, str(e), retry_after_s=e.retry_after_s)
    if isinstance(e, RequestTimeoutError):
        return _error(504, str(e))
    request_id, own = _request_id()
    if isinstance(e, EngineStepError):
        log.error("request %s: the engine failed it: %s", request_id, e)
        return _error(503, f"The engine could not run this request; retry later (request id {request_id}).",
                      retry_after_s=1, request_id=request_id if own else None)
    log.error("request %s: internal error", request_id, exc_info=e)
    return _error(500, f"Internal server error (request id {request_id}).",
                  request_id=request_id if own else None)


def _request_id() -> tuple[str, bool]:
    """Serve's id of the request being handled (Serve sends it as X-Request-Id and logs it), or
    our own when there is none; True when it is our own, which we then send ourselves."""
    try:
        from ray.serve.context import _get_serve_request_context

        serve_id = _get_serve_request_context().request_id
    except Exception:  # outside a replica
        serve_id = ""
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,100}", serve_id or ""):  # a client may choose it: keep it tame
        return serve_id, False
    return new_id("req"), True


def _status_of(e: Exception) -> int:
    if isinstance(e, APIError):
        return e.status
    for kind, status in ((QueueFullError, 429), (RequestTimeoutError, 504), (EngineStepError, 503)):
        if isinstance(e, kind):
            return status
    return 500


def _error_event(e: Exception) -> str:
    """An error inside a stream that has already begun: the same body, as an event."""
    err = _as_error(e)
    return sse(json.loads(err.body))


# Starlette runs the middleware added last outermost. A request without the key, or with too
# large a body, is refused before anything reads it; the metrics around both count those too.
api.add_middleware(BodyLimitMiddleware)
api.add_middleware(AuthMiddleware)
# Counts requests by route and status, errors by kind; an exception is counted with the status
# _as_error answers it with.
api.add_middleware(monitoring_http.MetricsMiddleware, status_of=_status_of)


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 120 else f"{text[:100]}... ({len(text)} characters)"


@api.exception_handler(RequestValidationError)
async def _validation_error(_: Request, e: RequestValidationError) -> JSONResponse:
    first = e.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    kind = first.get("type")
    if kind == "json_invalid":
        return _error(400, f"the request body is not valid JSON: {first.get('msg')}")
    where = ".".join(loc) or "body"
    if kind == "extra_forbidden":  # OpenAI's words for it
        return _error(400, f"Unrecognized request argument supplied: {where}", loc[0] if loc else None)
    if kind == "unsupported_field":
        field = (first.get("ctx") or {}).get("field")
        return _error(400, str(first.get("msg")), field)
    param = loc[0] if loc else None
    return _error(400, f"{where}: {first.get('msg')} (got {_shown(first.get('input'))})", param)


@api.exception_handler(APIError)
async def _api_error(_: Request, e: APIError) -> JSONResponse:
    return _as_error(e)


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
            yield _error_event(e)
            yield SSE_DONE
        finally:  # a client that left: aborting the request frees its slot now, not at GC
            await events.aclose()

    return StreamingResponse(body(), media_type="text/event-stream")


def engine_healthy(engine: Any) -> bool:
    """Whether the engine can step: its own `healthy()` where it has one (the executor's actors
    included), else whether its thread lives."""
    check = getattr(engine, "healthy", None) or getattr(engine, "is_alive", None)
    return check is None or bool(check())


def _model_vocab_size(engine: Any, tokenizer: Tokenizer) -> int:
    """Rows of the model's logits: the model config of the LLMEngine, or of the engine core
    process, where the engine has one (a test's fake engine may not; then the tokenizer's size)."""
    config = getattr(engine, "model_config", None) or getattr(getattr(engine, "engine", None), "config", None)
    return getattr(config, "vocab_size", None) or tokenizer.vocab_size


@serve.deployment(name="NextserveServer")
@serve.ingress(api)
class NextserveServer:
    def __init__(self, args: dict[str, Any], engine_factory: EngineFactory | None = None) -> None:
        from deployments.engine_factory import build_engine

        self.config = NextserveConfig.from_args(args)
        # How clients reach this replica (/stats says it): its own HTTP server where Serve started it
        # with direct ingress (`nextserve serve`, serve.ingress direct or auto), else Serve's proxy.
        self.ingress = "direct" if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") == "1" else "proxy"
        keep_replica_port_on_loopback()
        max_prompts = max_prompts_per_request(self.config)
        api.state.security = SecuritySettings.from_config(self.config)
        self.rebalance_gate = RebalanceGate(self.config.serve.rebalance_cooldown_s)
        engine, tokenizer, max_model_len = (engine_factory or build_engine)(self.config)
        self.engine = engine
        self.monitor = ReplicaMonitor(engine, self.config)
        self.ctx = ServingContext(engine=self.monitor.engine, tokenizer=tokenizer,
                                  max_model_len=max_model_len, model_name=served_model_name(self.config),
                                  vocab_size=_model_vocab_size(engine, tokenizer), max_prompts=max_prompts,
                                  reasoning_parser=self.config.serve.reasoning_parser,
                                  tool_call_parser=self.config.serve.tool_call_parser)

    @api.get("/health")
    async def health(self) -> Response:
        if not engine_healthy(self.engine):
            return _error(503, "the engine cannot run requests",
                          retry_after_s=self.config.serve.retry_after_s)
        return JSONResponse({"status": "ok"})

    @api.get("/v1/models")
    async def models(self) -> ModelList:
        return ModelList(data=[ModelCard(id=self.ctx.model_name, created=0,
                                         max_model_len=self.ctx.max_model_len)])

    @api.get("/stats")
    async def stats(self) -> dict[str, Any]:
        """The engine's counters and slot use (not part of the OpenAI API); spec_decode_accepted_per_pos
        is a list, one count per draft position; `compiling` a boolean (an `int` annotation here had
        FastAPI coerce it to 0 / 1); `ingress`: "direct" or "proxy", the path requests take here."""
        return {"ingress": self.ingress, **dataclasses.asdict(self.engine.stats())}

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
    async def rebalance(self, request: Request) -> Response:
        """Ask this replica to rebalance its expert shards from the load seen since its last look
        (`nextserve rebalance`); it happens between two engine steps, at the next step. Needs the
        admin key; a rebalance stalls every stream of the replica, hence the cool-down."""
        from cluster.rebalance import find_policy

        refused = self.rebalance_gate.check(request.scope)
        if refused is not None:
            status, message, retry_after_s = refused
            return _error(status, message, retry_after_s=retry_after_s)
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

    @api.post("/tokenize")
    async def tokenize(self, request: Request) -> Response:
        """vLLM's: a text `prompt` or chat `messages` -> {count, max_model_len, tokens, token_strs}.
        The body is one of two shapes (vLLM tells them apart by `messages`), so it is parsed here."""
        try:
            body = await request.json()
        except ValueError as e:
            return _error(400, f"the request body is not valid JSON: {e}")
        try:
            req = tokenization.parse_tokenize(body)
        except ValidationError as e:
            raise RequestValidationError(e.errors()) from None
        return JSONResponse((await tokenization.tokenize(self.ctx, req)).model_dump())

    @api.post("/detokenize")
    async def detokenize(self, req: DetokenizeRequest) -> Response:
        """vLLM's: {tokens} -> {prompt}, special tokens included."""
        return JSONResponse((await tokenization.detokenize(self.ctx, req)).model_dump())

    def check_health(self) -> None:
        """Serve replaces a replica whose engine cannot step (its thread died, its executor is gone)."""
        if not engine_healthy(self.engine):
            raise RuntimeError("the engine cannot run requests")

    def __del__(self) -> None:
        shutdown = getattr(getattr(self, "engine", None), "shutdown", None)
        if shutdown is not None:
            shutdown()
