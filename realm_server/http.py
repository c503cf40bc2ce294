"""The API over HTTP: OpenAI-compatible routes, JSON answers and server-sent events.

    POST /v1/completions, POST /v1/chat/completions   OpenAI-compatible; "stream": true answers with
                                                      server-sent events ending in `data: [DONE]`
    GET  /v1/models, /v1/models/{name}                the models the caller's tenant may use
    GET  /v1/adapters                                 the LoRA adapters it may use ("lora" in a request)
    PUT  /v1/adapters/{id}[?model=M], DELETE ...       load (body: the GGUF adapter file) / unload its own
    POST /v1/embeddings                               OpenAI's embeddings (pooled final hidden state)
    POST /tokenize, POST /detokenize                  llama-server's: {"content"} <-> {"tokens"}
    GET  /metrics                                     Prometheus text: the caller's tenant's series
    GET  /health                                      liveness and slot usage per model (no key needed)
    GET  /openapi.json                                OpenAPI 3.1 description of all of the above

Errors are JSON (errors.py): 400 bad input (invalid JSON, wrong type, out of range, prompt longer
than the context), 401 missing or unknown API key, 403 a model the tenant may not use, 404 unknown
model or route, 413 body too large, 429 tenant limits (with Retry-After), 503 every tenant together
is over the server's in-flight cap (with Retry-After). No field is ignored: an unknown one is a 400,
and so is one of OpenAI's that Realm does not implement (schema.REFUSED).
A client that goes away (closed stream, dropped connection) cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Route
from starlette.types import Receive, Scope, Send

from realm_wasm.errors import RealmError

from .doors import bearer, error_response
from .errors import ApiError, api_error
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .schema import openapi_document, parse_json_object
from .service import Generation, Service
from .tenants import Tenant

log = logging.getLogger("realm.server")

# a request body must come at this pace on average, after ApiSettings.body_timeout_s of grace
BODY_MIN_BYTES_PER_S = 1 << 20


def endpoint(handler: Callable[[Request], Any]) -> Callable[[Request], Any]:
    """An HTTP handler whose refusals (ApiError, or a RealmError by its code) become JSON error
    responses, as do its unexpected failures (logged with their traceback)."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as e:
            return error_response(e)
        except ClientDisconnect:  # it left while sending its body: nobody reads an answer
            log.info("%s %s: the client left before its body arrived", request.method, request.url.path)
            return Response(status_code=499)
        except RealmError as e:
            return error_response(api_error(e))
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return error_response(ApiError(500, "internal error"))

    return run


def caller(service: Service, conn: HTTPConnection, api_key: str | None) -> Tenant:
    return service.authenticate(conn.client.host if conn.client else "", api_key)


def check_content_length(request: Request, limit: int) -> int | None:
    """The declared body size; 413 past `limit`, judged by its digits before any int() is made of them.
    (uvicorn refuses a Content-Length that is not digits before the app sees the request.)"""
    declared = request.headers.get("content-length")
    if declared is None:
        return None
    digits = declared.strip().lstrip("0") or "0"
    if not (digits.isascii() and digits.isdigit()):
        raise ApiError(400, f"Content-Length {declared[:40]!r} is not a number of bytes")
    if len(digits) > len(str(limit)) or int(digits) > limit:
        raise ApiError(413, f"body of {declared[:40]} bytes is over the limit of {limit}")
    return int(digits)


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The raw body; 413 past `limit` bytes (before reading when Content-Length says so), 408 when it
    does not arrive within `timeout_s` plus a second per MiB it declares (a trickled body: slow loris)."""
    declared = check_content_length(request, limit)
    deadline_s = timeout_s + (declared if declared is not None else limit) / BODY_MIN_BYTES_PER_S
    body = bytearray()
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise ApiError(413, f"body is over the limit of {limit} bytes")
    except TimeoutError as e:
        raise ApiError(408, f"the request body did not arrive within {deadline_s:g} s ({len(body)} bytes came)",
                       headers={"Connection": "close"}) from e
    return bytes(body)


async def read_json(request: Request, limit: int, timeout_s: float) -> dict[str, Any]:
    """The body as a JSON object (read_body's limits), UTF-8 and with valid Unicode in every string."""
    return parse_json_object(await read_body(request, limit, timeout_s))


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def sse_events(generation: Generation) -> AsyncIterator[dict[str, Any] | str]:
    """The generation's chunks, then "[DONE]"; a failed generation's last event is its error."""
    try:
        async for chunk in generation.chunks(generation.job.include_usage):
            yield chunk
    except ApiError as e:
        yield e.body()
        return
    yield "[DONE]"


class EventStream:
    """A server-sent-events response that ends, and cancels its generation, when the client leaves.

    `ready()` says whether the next event comes without waiting: events that do go out in one write
    (one event each still), so that a loop that fell behind the stepping thread catches up rather
    than paying a send per token."""

    def __init__(self, events: AsyncIterator[dict[str, Any] | str], on_close: Callable[[], None],
                 ready: Callable[[], bool]) -> None:
        self.events, self.on_close, self.ready = events, on_close, ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

        async def pump() -> None:
            frames: list[bytes] = []
            async for event in self.events:
                data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
                frames.append(f"data: {data}\n\n".encode())
                if not self.ready():
                    await send({"type": "http.response.body", "body": b"".join(frames), "more_body": True})
                    frames.clear()
            await send({"type": "http.response.body", "body": b"".join(frames), "more_body": False})

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(wait_disconnect(receive))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # a send to a closed socket may fail
            self.on_close()


def http_routes(service: Service) -> list[BaseRoute]:
    """The API's HTTP routes; the last one answers every other /v1/ path with a JSON 404."""

    async def json_body(request: Request) -> dict[str, Any]:
        return await read_json(request, service.settings.max_body_bytes, service.settings.body_timeout_s)

    async def generate(request: Request, kind: str) -> Response:
        tenant = caller(service, request, bearer(request))
        body = await json_body(request)
        job = await service.prepare(tenant, body, kind)
        generation = service.start(job, tenant)
        if job.stream:
            return EventStream(sse_events(generation), generation.cancel, generation.ready)
        answer = asyncio.ensure_future(generation.answer())
        watch = asyncio.ensure_future(wait_disconnect(request.receive))
        try:
            await asyncio.wait([answer, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            left = not answer.done()  # the client left (or we are being shut down): stop generating
            if left:
                answer.cancel()
                generation.cancel()  # its slot frees at the next step
        if left:
            return Response(status_code=499)  # nobody reads this
        return JSONResponse(answer.result())

    async def completions(request: Request) -> Response:
        return await generate(request, "completion")

    async def chat_completions(request: Request) -> Response:
        return await generate(request, "chat")

    async def list_models(request: Request) -> Response:
        tenant = caller(service, request, bearer(request))
        data = [service.model_card(service.models[name]) for name in service.model_names(tenant)]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(request: Request) -> Response:
        tenant = caller(service, request, bearer(request))
        return JSONResponse(service.model_card(service.model_for(tenant, request.path_params["name"])))

    async def list_adapters(request: Request) -> Response:
        tenant = caller(service, request, bearer(request))
        return JSONResponse({"object": "list", "data": await service.adapter_cards(tenant)})

    async def put_adapter(request: Request) -> Response:
        tenant = caller(service, request, bearer(request))
        data = await read_body(request, service.settings.max_adapter_bytes, service.settings.body_timeout_s)
        return JSONResponse(await service.load_adapter(tenant, request.path_params["id"], data,
                                                       request.query_params.get("model")))

    async def delete_adapter(request: Request) -> Response:
        tenant = caller(service, request, bearer(request))
        adapter_id = request.path_params["id"]
        await service.unload_adapter(tenant, adapter_id, request.query_params.get("model"))
        return JSONResponse({"id": adapter_id, "object": "adapter", "deleted": True})

    async def health(request: Request) -> Response:
        return JSONResponse(service.health())

    async def openapi(request: Request) -> Response:
        return JSONResponse(openapi_document(service.settings.default_max_tokens))

    async def embeddings(request: Request) -> Response:
        tenant = caller(service, request, bearer(request))
        return JSONResponse(await service.embeddings(tenant, await json_body(request)))

    async def tokenize(request: Request) -> Response:
        tenant = caller(service, request, bearer(request))
        return JSONResponse(await service.tokenize(tenant, await json_body(request)))

    async def detokenize(request: Request) -> Response:
        tenant = caller(service, request, bearer(request))
        return JSONResponse(service.detokenize(tenant, await json_body(request)))

    async def metrics(request: Request) -> Response:
        tenant = caller(service, request, bearer(request))
        return Response(service.metrics.text(tenant.id, tenant.may_use_model), media_type=METRICS_CONTENT_TYPE)

    async def not_found(request: Request) -> Response:
        # a known path asked with another method: 405, as Starlette says when no catch-all is behind
        allowed = sorted({method for route in routes[:-1] if route.matches(request.scope)[0] == Match.PARTIAL
                          for method in route.methods or ()})
        if allowed:
            raise ApiError(405, f"{request.method} is not allowed on {request.url.path}",
                           headers={"Allow": ", ".join(allowed)})
        raise ApiError(404, f"no route {request.method} {request.url.path}")

    routes: list[BaseRoute] = [
        Route("/v1/completions", endpoint(completions), methods=["POST"]),
        Route("/v1/chat/completions", endpoint(chat_completions), methods=["POST"]),
        Route("/v1/models", endpoint(list_models), methods=["GET"]),
        Route("/v1/models/{name:path}", endpoint(get_model), methods=["GET"]),
        Route("/v1/adapters", endpoint(list_adapters), methods=["GET"]),
        Route("/v1/adapters/{id}", endpoint(put_adapter), methods=["PUT"]),
        Route("/v1/adapters/{id}", endpoint(delete_adapter), methods=["DELETE"]),
        Route("/v1/embeddings", endpoint(embeddings), methods=["POST"]),
        Route("/tokenize", endpoint(tokenize), methods=["POST"]),
        Route("/detokenize", endpoint(detokenize), methods=["POST"]),
        Route("/metrics", endpoint(metrics), methods=["GET"]),
        Route("/health", endpoint(health), methods=["GET"]),
        Route("/openapi.json", endpoint(openapi), methods=["GET"]),
        Route("/v1/{path:path}", endpoint(not_found), methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]
    return routes
