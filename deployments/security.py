"""What stands between the network and the routes: the API key and the admin key (bearer tokens,
compared in constant time), the request body limit, the rebalance cool-down, and the start-up
check of the per-request limits. The middlewares read their settings from `app.state.security`,
which the replica sets once when it starts."""

from __future__ import annotations

import hmac
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi.responses import JSONResponse

from deployments.config import NextserveConfig
from deployments.response_models import error_body
from engine.config import NextserveConfigError

API_KEY_ENV = "NEXTSERVE_API_KEY"
ADMIN_API_KEY_ENV = "NEXTSERVE_ADMIN_API_KEY"
OPEN_PATHS = frozenset({"/health"})  # load balancers probe it without credentials
ADMIN_PATHS = frozenset({"/rebalance"})  # the admin key, checked by the route itself

Scope = dict[str, Any]


@dataclass(frozen=True)
class SecuritySettings:
    api_key: str | None = field(default=None, repr=False)
    admin_api_key: str | None = field(default=None, repr=False)
    max_request_bytes: int = 4 << 20

    @classmethod
    def from_config(cls, config: NextserveConfig) -> SecuritySettings:
        s = config.serve
        return cls(api_key=_secret(s.api_key) or os.environ.get(API_KEY_ENV) or None,
                   admin_api_key=_secret(s.admin_api_key) or os.environ.get(ADMIN_API_KEY_ENV) or None,
                   max_request_bytes=s.max_request_bytes)


def _secret(value: Any) -> str | None:
    return value.get_secret_value() if value is not None else None


def keys_from_environment(args: dict[str, Any]) -> dict[str, Any]:
    """`args` with the keys of this process's environment filled in where the config has none, so
    replicas started on other nodes (which do not share the environment) check them too."""
    serve = dict(args.get("serve") or {})
    for key, env in (("api_key", API_KEY_ENV), ("admin_api_key", ADMIN_API_KEY_ENV)):
        if serve.get(key) is None and os.environ.get(env):
            serve[key] = os.environ[env]
    return {**args, "serve": serve} if serve else dict(args)


def max_prompts_per_request(config: NextserveConfig) -> int:
    """A request with more prompts than a replica can admit could only ever get 429."""
    capacity = config.engine.max_num_seqs + config.serve.max_queued_requests
    limit = config.serve.max_prompts_per_request
    if limit is not None and limit > capacity:
        raise NextserveConfigError(
            f"serve.max_prompts_per_request: {limit} is more than a replica can admit (engine.max_num_seqs "
            f"+ serve.max_queued_requests = {capacity}); such a request could never run")
    return capacity if limit is None else limit


def bearer_matches(scope: Scope, key: str) -> bool:
    """`Authorization: Bearer <key>`, compared in constant time."""
    value = _header(scope, b"authorization") or b""
    scheme, _, token = value.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode())


def _header(scope: Scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers") or () if k.lower() == name), None)


def _route_path(scope: Scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


def _settings(scope: Scope) -> SecuritySettings:
    app = scope.get("app")
    return getattr(getattr(app, "state", None), "security", None) or SecuritySettings()


async def _refuse(send: Any, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    response = JSONResponse(error_body(message, status), status_code=status, headers=headers)
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> dict[str, Any]:
    return {"type": "http.disconnect"}


class AuthMiddleware:
    """401 in OpenAI's form unless the request carries the API key (when one is set)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        key = _settings(scope).api_key
        if scope["type"] != "http" or key is None or _route_path(scope) in OPEN_PATHS | ADMIN_PATHS \
                or bearer_matches(scope, key):
            await self.app(scope, receive, send)
            return
        await _refuse(send, 401, "Incorrect or missing API key: send it as `Authorization: Bearer <key>`.",
                      {"WWW-Authenticate": "Bearer"})


class BodyLimitMiddleware:
    """413 for a body over `max_request_bytes`, by its Content-Length or by the bytes that arrive;
    the app sees the body only once all of it is in and within the limit."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = _settings(scope).max_request_bytes
        too_large = f"The request body is larger than this server's limit of {limit} bytes."
        length = _header(scope, b"content-length")
        if length is not None and (not length.strip().isdigit() or int(length) > limit):
            await _refuse(send, 413, too_large)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left before sending all of it
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > limit:
                await _refuse(send, 413, too_large)
                return
            if not message.get("more_body", False):
                break
        body = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if replayed:  # after the body: disconnects, which streaming responses listen for
                return await receive()
            replayed = True
            return body

        await self.app(scope, replay, send)


class RebalanceGate:
    """The admin key and the cool-down of POST /rebalance: `check` returns None when the caller may
    go ahead, else (status, message, Retry-After seconds or None)."""

    def __init__(self, cooldown_s: float, clock: Any = time.monotonic) -> None:
        self.cooldown_s, self.clock = cooldown_s, clock
        self._last: float | None = None

    def check(self, scope: Scope) -> tuple[int, str, float | None] | None:
        key = _settings(scope).admin_api_key
        if key is None:
            return 403, (f"POST /rebalance is off: set serve.admin_api_key (or ${ADMIN_API_KEY_ENV}) and "
                         f"send it as `Authorization: Bearer <key>`"), None
        if not bearer_matches(scope, key):
            return 401, "Incorrect or missing admin key: send it as `Authorization: Bearer <key>`.", None
        now = self.clock()
        if self._last is not None and now - self._last < self.cooldown_s:
            wait = self.cooldown_s - (now - self._last)
            return 429, (f"a rebalance was requested {now - self._last:.0f}s ago; the next one is "
                         f"allowed after serve.rebalance_cooldown_s={self.cooldown_s:g}s"), wait
        self._last = now
        return None


_replica_port_patched = False


def keep_replica_port_on_loopback() -> None:
    """Ray Serve binds every replica's inter-deployment gRPC server to all interfaces ("[::]:0",
    hard-coded in ray/serve/_private/replica.py as of Ray 2.60), started right after the
    deployment's constructor. On a node whose Ray address is loopback (a cluster nextserve started
    on one machine) nothing off the machine is meant to reach any Ray port, so bind that one to
    loopback too. Elsewhere Serve's own choice stands (the README's security section: firewall
    the nodes). Patches a private Ray function; tests/deployments/test_app.py checks the result."""
    global _replica_port_patched
    import ipaddress

    import ray
    from ray.serve._private import replica

    if _replica_port_patched or not ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        return
    original = replica.add_port_to_grpc_server

    def on_loopback(server: Any, address: str) -> int:
        return original(server, address.replace("[::]", "127.0.0.1", 1))

    replica.add_port_to_grpc_server = on_loopback
    _replica_port_patched = True
