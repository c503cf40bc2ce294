"""Realm's inference API: OpenAI-compatible HTTP, a WebSocket stream, tenants, over one scheduler per model.

Routes (`Api.routes`):
    POST /v1/completions, POST /v1/chat/completions   OpenAI-compatible; "stream": true answers with
                                                      server-sent events ending in `data: [DONE]`
    GET  /v1/models, /v1/models/{name}                the models the caller's tenant may use
    GET  /health                                      liveness and slot usage per model (no key needed)
    GET  /openapi.json                                OpenAPI 3.1 description of all of the above
    WS   /ws                                          token streaming with cancel (protocol below)

Every model runs in its own background thread that steps a `realm_wasm.scheduler.Scheduler` (the
executor is not thread-safe); its events reach asyncio through `loop.call_soon_threadsafe`. A client
that goes away (closed stream, dropped connection, closed WebSocket) cancels its generation, which
frees its KV slot at the next step.

Errors are JSON, `{"error": {"message", "type", "param", "code"}}`, with `param` naming the field:
400 bad input (invalid JSON, wrong type, out of range, prompt longer than the context), 401 missing
or unknown API key, 403 a model or setting the tenant may not use, 404 unknown model or route,
413 body too large, 429 tenant limits (with Retry-After), 503 every tenant together is over the
server's in-flight cap (with Retry-After). Fields the API does not know are ignored.

WebSocket protocol (JSON text messages):
    client -> {"type": "auth", "api_key": KEY}        first, unless an Authorization header was sent
    server -> {"type": "ready", "tenant": ID, "models": [NAME, ...]}
    client -> {"type": "generate", "id": ID, "model": ..., "prompt": ... | "messages": [...],
               "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "lora"}   (as over HTTP)
    server -> {"type": "token", "id": ID, "text": "..."}                                 (many)
    server -> {"type": "done", "id": ID, "finish_reason": "stop"|"length"|"cancelled", "usage": {...}}
    client -> {"type": "cancel", "id": ID}
    server -> {"type": "error", "id": ID | null, "status": 4xx, "error": {...}, "retry_after": s?}
Ids are the client's own and live per connection: one connection cannot see or cancel another's.
A bad message gets an error and the connection stays open; a failed auth closes it (code 1008).

Mounting next to the static app (`server.static`), API routes first since the static catch-all
route matches every path:

    api = Api([load_model(path, n_slots=8, n_ctx=2048)], load_tenants(cfg) if cfg else None)
    check_bind_host(host, api.tenants)                     # open access only on loopback
    app = Starlette(routes=[*api.routes, *static_routes(static_settings)], lifespan=api.lifespan,
                    middleware=[Middleware(RequestLog, hook=static_settings.on_request)])
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route, WebSocketRoute
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket, WebSocketDisconnect

from realm_wasm.engine import PREFILL_CHUNK, Engine, TokenEvent
from realm_wasm.sampling import SamplingParams
from realm_wasm.scheduler import Event, Finished, Scheduler
from realm_wasm.scheduler import Request as GenerationRequest

from .chat_template import ChatTemplate, ChatTemplateError
from .tenants import Limiter, Tenant, Tenants, check_bind_host, is_loopback, load_tenants, retry_after_header

log = logging.getLogger("realm.server")

MAX_SEED = 2**64 - 1
WS_AUTH_TIMEOUT_S = 10.0


# --- errors ----------------------------------------------------------------------------------------

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
               500: "server_error", 503: "server_busy"}


class ApiError(Exception):
    """A request the API refuses: becomes an HTTP error response or a WebSocket error message."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 headers: dict[str, str] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": ERROR_TYPES.get(self.status, "error"),
                          "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), self.status, headers=self.headers)


def endpoint(handler: Callable[..., Any]) -> Callable[[Request], Any]:
    """An HTTP handler whose ApiErrors become JSON error responses, as do its unexpected failures."""

    async def run(request: Request) -> Response:
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except Exception:
            log.exception("%s %s failed", request.method, request.url.path)
            return ApiError(500, "internal error").response()

    return run


# --- request schemas: one table drives validation and the OpenAPI document ------------------------

def _nullable(kind: str, **rules: Any) -> dict[str, Any]:
    return {"type": [kind, "null"], **rules}


PROMPT = {"anyOf": [
    {"type": "string", "title": "a string"},
    {"type": "array", "title": "an array of token ids", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
    {"type": "array", "title": "an array of one string", "minItems": 1, "maxItems": 1, "items": {"type": "string"}},
], "description": "the text to continue (or its token ids, BOS included)"}

MESSAGES = {"type": "array", "minItems": 1, "description": "the conversation so far", "items": {
    "type": "object", "required": ["role", "content"], "properties": {
        "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
        "content": {"anyOf": [
            {"type": "string", "title": "a string"},
            {"type": "array", "title": "an array of text parts", "items": {
                "type": "object", "required": ["type", "text"],
                "properties": {"type": {"enum": ["text"]}, "text": {"type": "string"}}}},
        ]},
        "name": {"type": "string"},
    }}}

GENERATION_PROPERTIES: dict[str, dict[str, Any]] = {
    "model": {"type": "string", "description": "a name from GET /v1/models"},
    "max_tokens": _nullable("integer", minimum=1, description="tokens to generate at most (default: the "
                            "server's default_max_tokens, cut to what the context has left)"),
    "temperature": _nullable("number", minimum=0, maximum=2, description="0 = greedy; default 1"),
    "top_p": _nullable("number", exclusiveMinimum=0, maximum=1),
    "top_k": _nullable("integer", minimum=0, description="0 = no top-k cut"),
    "seed": _nullable("integer", minimum=-(2**63), maximum=MAX_SEED,
                      description="same seed and parameters give the same tokens; default random"),
    "stop": {"anyOf": [
        {"type": "string", "title": "a string", "minLength": 1},
        {"type": "array", "title": "an array of up to 4 strings", "maxItems": 4,
         "items": {"type": "string", "minLength": 1}},
        {"type": "null", "title": "null"},
    ], "description": "generation ends before the first of these; they are not returned"},
    "stream": _nullable("boolean"),
    "stream_options": _nullable("object", properties={"include_usage": {"type": "boolean"}}),
    "n": _nullable("integer", minimum=1, maximum=1, description="only 1 choice is supported"),
    "presence_penalty": _nullable("number", minimum=0, maximum=0, description="only 0 is supported"),
    "frequency_penalty": _nullable("number", minimum=0, maximum=0, description="only 0 is supported"),
    "user": {"type": "string"},
    "lora": _nullable("string", description="Realm extension: LoRA adapter (default: the tenant's own)"),
}

COMPLETION_SCHEMA = {"type": "object", "required": ["model", "prompt"],
                     "properties": {**GENERATION_PROPERTIES, "prompt": PROMPT}}
CHAT_SCHEMA = {"type": "object", "required": ["model", "messages"],
               "properties": {**GENERATION_PROPERTIES, "messages": MESSAGES,
                              "max_completion_tokens": GENERATION_PROPERTIES["max_tokens"]}}
WS_MESSAGE_SCHEMA = {"type": "object", "required": ["type"], "properties": {
    "type": {"enum": ["auth", "generate", "cancel"]},
    "id": {"type": "string", "minLength": 1, "maxLength": 128},
    "api_key": {"type": "string"},
}}

JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "array": lambda v: isinstance(v, list),
    "object": lambda v: isinstance(v, dict),
    "null": lambda v: v is None,
}
# schema keyword -> (fails when, message)
RULES: dict[str, tuple[Callable[[Any, Any], bool], str]] = {
    "minimum": (lambda v, m: v < m, "must be >= {}"),
    "maximum": (lambda v, m: v > m, "must be <= {}"),
    "exclusiveMinimum": (lambda v, m: v <= m, "must be > {}"),
    "minLength": (lambda v, m: len(v) < m, "must have at least {} characters"),
    "maxLength": (lambda v, m: len(v) > m, "must have at most {} characters"),
    "minItems": (lambda v, m: len(v) < m, "must have at least {} items"),
    "maxItems": (lambda v, m: len(v) > m, "must have at most {} items"),
    "enum": (lambda v, m: v not in m, "must be one of {}"),
}


def _type_ok(value: Any, schema: dict[str, Any]) -> bool:
    kinds = schema.get("type")
    if kinds is None:
        return True
    return any(JSON_TYPES[k](value) for k in ([kinds] if isinstance(kinds, str) else kinds))


def validate(value: Any, schema: dict[str, Any], path: str) -> None:
    """Check a JSON value against the subset of JSON Schema used above; ApiError(400) names the field."""
    if "anyOf" in schema:
        options = schema["anyOf"]
        matching = [o for o in options if _type_ok(value, o)]
        for option in matching:
            with contextlib.suppress(ApiError):
                validate(value, option, path)
                return
        if len(matching) == 1:  # the right kind of value, wrong inside: say what is wrong
            validate(value, matching[0], path)
        raise ApiError(400, f"{path} must be {' or '.join(o['title'] for o in options)}", path)
    if not _type_ok(value, schema):
        kinds = schema["type"]
        expected = " or ".join([kinds] if isinstance(kinds, str) else kinds)
        raise ApiError(400, f"{path} must be {expected}, got {type(value).__name__} {json.dumps(value)[:40]}", path)
    if value is None:
        return
    for rule, (fails, message) in RULES.items():
        if rule in schema and fails(value, schema[rule]):
            raise ApiError(400, f"{path} {message.format(schema[rule])}", path)
    if isinstance(value, dict):
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                validate(value[key], sub, _join(path, key))
        for key in schema.get("required", ()):
            if key not in value:
                raise ApiError(400, f"missing required field {_join(path, key)}", _join(path, key))
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            validate(item, schema["items"], f"{path}[{i}]")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object; 413 past `limit` bytes (before reading it when Content-Length says so)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"body is over the limit of {limit} bytes")
    return parse_json_object(bytes(body))


def parse_json_object(raw: bytes | str) -> dict[str, Any]:
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError) as e:  # RecursionError: absurdly deep nesting
        raise ApiError(400, f"body is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise ApiError(400, f"body must be a JSON object, got {type(value).__name__}")
    return value


# --- models and their stepping threads -------------------------------------------------------------

@dataclass
class ServedModel:
    """One loaded model as the API serves it."""

    name: str
    engine: Engine
    n_slots: int  # the engine's executor must have been built with this many KV slots
    max_step_tokens: int = PREFILL_CHUNK
    adapters: frozenset[str] = frozenset()  # LoRA adapters loaded for it, by name
    chat: ChatTemplate = field(init=False)
    max_prompt_chars: int = field(init=False)  # longer text cannot fit the context: refused untokenized

    def __post_init__(self) -> None:
        tokenizer = self.engine.tokenizer
        self.chat = ChatTemplate.from_metadata(tokenizer, self.engine.model.header.metadata)
        self.max_prompt_chars = self.engine.n_ctx * max(len(t) for t in tokenizer.tokens)


def load_model(path: str | Path, name: str | None = None, backend: str = "auto", n_ctx: int = 2048,
               n_slots: int = 4) -> ServedModel:
    """Load a GGUF file for serving, named after the file unless `name` is given."""
    path = Path(path)
    engine = Engine.load(path, backend=backend, n_ctx=n_ctx, n_slots=n_slots)
    return ServedModel(name or path.name.removesuffix(".gguf"), engine, n_slots)


class ModelWorker:
    """Steps one model's scheduler on a background thread; delivers events on the asyncio loop."""

    def __init__(self, model: ServedModel, shares: dict[str, float]) -> None:
        self.model = model
        self.scheduler = Scheduler(model.engine, model.n_slots, model.max_step_tokens, shares)
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name=f"realm-{model.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stopping:
            try:
                worked = self.scheduler.step()
            except Exception:  # a bug, not bad input: fail what runs rather than hang every client
                log.exception("scheduler step failed for %s", self.model.name)
                self.scheduler.cancel_all()
                continue
            if not worked:
                self._wake.wait()
                self._wake.clear()
        self.scheduler.cancel_all()

    def submit(self, request: GenerationRequest, on_event: Callable[[Event], None]) -> int:
        """Queue a generation; `on_event` runs on the calling asyncio loop for every event."""
        loop = asyncio.get_running_loop()

        def sink(event: Event) -> None:
            with contextlib.suppress(RuntimeError):  # the loop closed at shutdown: nobody listens
                loop.call_soon_threadsafe(on_event, event)

        if not self._thread.is_alive():
            raise RuntimeError(f"the worker of {self.model.name!r} is not running (is Api.lifespan in use?)")
        seq_id = self.scheduler.submit(request, sink)
        self._wake.set()
        return seq_id

    def cancel(self, seq_id: int) -> None:
        self.scheduler.cancel(seq_id)
        self._wake.set()


# --- jobs: a checked request, then a running one ---------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """How one endpoint's JSON looks (OpenAI's text completion vs chat completion)."""

    object: str
    chunk_object: str
    id_prefix: str
    choice: Callable[[str], dict[str, Any]]  # the full text -> the choice's payload
    delta: Callable[[str], dict[str, Any]]  # a streamed piece -> the chunk choice's payload
    strip_leading_space: bool  # chat content starts at its first visible character


SHAPES = {
    "completion": Shape("text_completion", "text_completion", "cmpl-",
                        lambda text: {"text": text, "logprobs": None},
                        lambda text: {"text": text, "logprobs": None}, False),
    "chat": Shape("chat.completion", "chat.completion.chunk", "chatcmpl-",
                  lambda text: {"message": {"role": "assistant", "content": text}},
                  lambda text: {"delta": {"content": text}}, True),
}


@dataclass
class Job:
    kind: str  # a SHAPES key
    model: ServedModel
    request: GenerationRequest
    include_usage: bool
    id: str = field(default_factory=lambda: secrets.token_hex(12))
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def shape(self) -> Shape:
        return SHAPES[self.kind]


class TextShaper:
    """Drops a chat answer's leading whitespace (the plain template leaves a space after 'Assistant:')."""

    def __init__(self, strip_leading: bool) -> None:
        self.stripping = strip_leading

    def __call__(self, text: str) -> str:
        if self.stripping:
            text = text.lstrip()
            self.stripping = not text
        return text


@dataclass
class Running:
    worker: ModelWorker
    seq_id: int = -1
    finished: bool = False

    def cancel(self) -> None:
        if not self.finished:
            self.worker.cancel(self.seq_id)


def usage(event: Finished) -> dict[str, int]:
    return {"prompt_tokens": event.prompt_tokens, "completion_tokens": event.completion_tokens,
            "total_tokens": event.prompt_tokens + event.completion_tokens}


def failure(event: Finished) -> ApiError:
    """The error for a generation that ended without finishing (the worker failed or shut down)."""
    if event.reason == "cancelled":
        return ApiError(503, "the generation was cancelled (the server is shutting down)")
    return ApiError(500, f"generation failed: {event.error}")


async def until_finished(queue: asyncio.Queue[Event]) -> AsyncIterator[Event]:
    while True:
        event = await queue.get()
        yield event
        if isinstance(event, Finished):
            return


async def wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


class EventStream:
    """A server-sent-events response that ends, and cancels its generation, when the client leaves."""

    def __init__(self, events: AsyncIterator[dict[str, Any] | str], on_close: Callable[[], None]) -> None:
        self.events, self.on_close = events, on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [
            (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no")]})

        async def pump() -> None:
            async for event in self.events:
                data = event if isinstance(event, str) else json.dumps(event, ensure_ascii=False)
                await send({"type": "http.response.body", "body": f"data: {data}\n\n".encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})

        tasks = [asyncio.ensure_future(pump()), asyncio.ensure_future(wait_disconnect(receive))]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # a send to a closed socket may fail
            self.on_close()


# --- the API ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ApiSettings:
    max_body_bytes: int = 1 << 20
    max_in_flight: int = 256  # requests queued or running over all tenants (503 beyond)
    default_max_tokens: int = 256


class Api:
    """The routes and lifespan serving `models` to `tenants` (None: open access, loopback clients only)."""

    def __init__(self, models: Sequence[ServedModel], tenants: Tenants | None = None,
                 settings: ApiSettings = ApiSettings()) -> None:
        names = [m.name for m in models]
        if not models or len(set(names)) != len(names):
            raise ValueError(f"need at least one model and unique names, got {names}")
        self.models = {m.name: m for m in models}
        self.tenants = tenants or Tenants.open_access()
        self.settings = settings
        self.limiters = {t.id: Limiter(t) for t in self.tenants.by_id.values()}
        self.workers = {m.name: ModelWorker(m, self.tenants.shares) for m in models}
        self.in_flight = 0

    @property
    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/completions", endpoint(self.completions), methods=["POST"]),
            Route("/v1/chat/completions", endpoint(self.chat_completions), methods=["POST"]),
            Route("/v1/models", endpoint(self.list_models), methods=["GET"]),
            Route("/v1/models/{name:path}", endpoint(self.get_model), methods=["GET"]),
            Route("/health", endpoint(self.health), methods=["GET"]),
            Route("/openapi.json", endpoint(self.openapi), methods=["GET"]),
            Route("/v1/{path:path}", endpoint(self.not_found), methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
            WebSocketRoute("/ws", self.websocket),
        ]

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        for worker in self.workers.values():
            worker.start()
        try:
            yield
        finally:
            await asyncio.gather(*(asyncio.to_thread(w.stop) for w in self.workers.values()))

    # --- who is calling ---

    def authenticate(self, conn: HTTPConnection, api_key: str | None) -> Tenant:
        if self.tenants.open:
            client = conn.client.host if conn.client else ""
            if not is_loopback(client):
                raise ApiError(403, "this server has no tenants configured and serves loopback clients only")
        tenant = self.tenants.authenticate(api_key)
        if tenant is None:
            message = "invalid API key" if api_key else "missing API key (send Authorization: Bearer KEY)"
            raise ApiError(401, message, headers={"WWW-Authenticate": "Bearer"})
        return tenant

    @staticmethod
    def bearer(conn: HTTPConnection) -> str | None:
        scheme, _, key = conn.headers.get("authorization", "").partition(" ")
        return key.strip() if scheme.lower() == "bearer" and key.strip() else None

    def model_for(self, tenant: Tenant, name: str) -> ServedModel:
        model = self.models.get(name)
        if model is None:
            raise ApiError(404, f"model {name!r} does not exist (see GET /v1/models)", "model", code="model_not_found")
        if not tenant.may_use_model(name):
            raise ApiError(403, f"tenant {tenant.id!r} may not use model {name!r}", "model")
        return model

    # --- from a request body to a running generation ---

    async def prepare(self, tenant: Tenant, body: dict[str, Any], kind: str) -> Job:
        """Validate a completion/chat body into a Job: every 4xx about the request's content is raised here."""
        validate(body, CHAT_SCHEMA if kind == "chat" else COMPLETION_SCHEMA, "")
        model = self.model_for(tenant, body["model"])
        self.check_lora(tenant, model, body.get("lora"))
        ids, template_stop = await self.prompt_ids(model, body, kind)
        n_ctx = model.engine.n_ctx
        if len(ids) >= n_ctx:
            raise ApiError(400, f"prompt is {len(ids)} tokens; the context of {model.name!r} holds {n_ctx}, "
                           "with room for at least one generated token", "messages" if kind == "chat" else "prompt")
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        if max_tokens is None:
            max_tokens = min(self.settings.default_max_tokens, n_ctx - len(ids))
        elif len(ids) + max_tokens > n_ctx:
            param = "max_completion_tokens" if body.get("max_completion_tokens") else "max_tokens"
            raise ApiError(400, f"prompt of {len(ids)} tokens + {param} {max_tokens} exceeds the context of "
                           f"{n_ctx} tokens of {model.name!r}", param)
        stop = body.get("stop") or ()
        seed = body.get("seed")
        sampling = SamplingParams(
            temperature=float(_default(body.get("temperature"), 1.0)), top_k=int(body.get("top_k") or 0),
            top_p=float(_default(body.get("top_p"), 1.0)),
            seed=(secrets.randbits(32) if seed is None else seed) & 0xFFFFFFFF)
        request = GenerationRequest(ids, max_tokens, sampling, tenant.id,
                                    stop=(*([stop] if isinstance(stop, str) else stop), *template_stop))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return Job(kind, model, request, include_usage)

    @staticmethod
    def check_lora(tenant: Tenant, model: ServedModel, asked: str | None) -> None:
        adapter = asked or tenant.lora
        if adapter is None:
            return
        if asked is not None and not tenant.may_use_lora(asked):
            raise ApiError(403, f"tenant {tenant.id!r} may not use LoRA adapter {asked!r}", "lora")
        if adapter not in model.adapters:
            raise ApiError(400, f"model {model.name!r} has no LoRA adapter {adapter!r} loaded", "lora")

    async def prompt_ids(self, model: ServedModel, body: dict[str, Any],
                         kind: str) -> tuple[list[int], tuple[str, ...]]:
        """Token ids of the prompt (chat: rendered with the model's template) and the template's stops."""
        tokenizer = model.engine.tokenizer
        if kind == "chat":
            try:
                # templates and tokenizing are pure Python: off the event loop
                chat = await asyncio.to_thread(model.chat.render, body["messages"])
            except ChatTemplateError as e:
                raise ApiError(400, str(e), "messages") from e
            text, add_bos, stop, param = chat.text, chat.add_bos, chat.stop, "messages"
        else:
            prompt = body["prompt"]
            if isinstance(prompt, list) and isinstance(prompt[0], int):
                if max(prompt) >= tokenizer.vocab_size:
                    raise ApiError(400, f"prompt has token ids outside the vocab of {tokenizer.vocab_size}", "prompt")
                return prompt, ()
            text, add_bos, stop, param = (prompt[0] if isinstance(prompt, list) else prompt), True, (), "prompt"
        if len(text) > model.max_prompt_chars:
            raise ApiError(400, f"prompt of {len(text)} characters cannot fit the context of "
                           f"{model.engine.n_ctx} tokens of {model.name!r}", param)
        return await asyncio.to_thread(tokenizer.encode, text, add_bos), stop

    def start(self, job: Job, tenant: Tenant, on_event: Callable[[Event], None]) -> Running:
        """Admit a job under the server's and the tenant's limits and hand it to its model's scheduler."""
        req = job.request
        cost = len(req.prompt_ids) + req.max_tokens
        limiter = self.limiters[tenant.id]
        if limiter.exceeds_bucket(cost):
            raise ApiError(400, f"prompt tokens + max_tokens = {cost} is more than tenant {tenant.id!r} may use "
                           f"in a minute ({tenant.tokens_per_minute})", "max_tokens")
        if self.in_flight >= self.settings.max_in_flight:
            raise ApiError(503, f"the server has {self.in_flight} requests in flight; retry shortly",
                           headers={"Retry-After": "1"})
        refused = limiter.try_acquire(cost)
        if refused is not None:
            wait, reason = refused
            raise ApiError(429, reason, headers={"Retry-After": retry_after_header(wait)})
        self.in_flight += 1
        running = Running(self.workers[job.model.name])
        t0 = time.perf_counter()

        def deliver(event: Event) -> None:
            if isinstance(event, Finished):
                running.finished = True
                self.in_flight -= 1
                limiter.release(req.max_tokens - event.completion_tokens)
                log.info("%s %s tenant=%s model=%s prompt=%d completion=%d finish=%s %.2fs", job.kind, job.id,
                         tenant.id, job.model.name, event.prompt_tokens, event.completion_tokens, event.reason,
                         time.perf_counter() - t0)
            on_event(event)

        try:
            running.seq_id = running.worker.submit(req, deliver)
        except (ValueError, RuntimeError) as e:  # refused at once: no Finished will come to release it
            self.in_flight -= 1
            limiter.release(req.max_tokens)
            if isinstance(e, ValueError):  # prepare() checked this already; the scheduler's own guard
                raise ApiError(400, str(e), "prompt") from e
            raise ApiError(503, str(e)) from e
        return running

    # --- HTTP endpoints ---

    async def completions(self, request: Request) -> Response:
        return await self.generate(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        return await self.generate(request, "chat")

    async def generate(self, request: Request, kind: str) -> Response:
        tenant = self.authenticate(request, self.bearer(request))
        body = await read_json(request, self.settings.max_body_bytes)
        job = await self.prepare(tenant, body, kind)
        queue: asyncio.Queue[Event] = asyncio.Queue()
        running = self.start(job, tenant, queue.put_nowait)
        if body.get("stream"):
            return EventStream(self.sse_events(job, queue), running.cancel)
        collect = asyncio.ensure_future(self.collect(job, queue))
        watch = asyncio.ensure_future(wait_disconnect(request.receive))
        try:
            await asyncio.wait([collect, watch], return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not collect.done():  # the client left (or we are being shut down): stop generating
                collect.cancel()
                running.cancel()
        if collect.cancelled():
            return Response(status_code=499)  # nobody reads this
        return JSONResponse(collect.result())

    async def collect(self, job: Job, queue: asyncio.Queue[Event]) -> dict[str, Any]:
        shaper = TextShaper(job.shape.strip_leading_space)
        parts, end = [], None
        async for event in until_finished(queue):
            if isinstance(event, TokenEvent):
                parts.append(shaper(event.text))
            else:
                end = event
        if end.reason not in ("stop", "length"):
            raise failure(end)
        choice = {"index": 0, **job.shape.choice("".join(parts)), "finish_reason": end.reason}
        return {"id": job.shape.id_prefix + job.id, "object": job.shape.object, "created": job.created,
                "model": job.model.name, "choices": [choice], "usage": usage(end)}

    async def sse_events(self, job: Job, queue: asyncio.Queue[Event]) -> AsyncIterator[dict[str, Any] | str]:
        shape, shaper = job.shape, TextShaper(job.shape.strip_leading_space)

        def chunk(payload: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
            return {"id": shape.id_prefix + job.id, "object": shape.chunk_object, "created": job.created,
                    "model": job.model.name, "choices": [{"index": 0, **payload, "finish_reason": finish_reason}]}

        if job.kind == "chat":
            yield chunk({"delta": {"role": "assistant", "content": ""}}, None)
        async for event in until_finished(queue):
            if isinstance(event, TokenEvent):
                text = shaper(event.text)
                if text:
                    yield chunk(shape.delta(text), None)
            elif event.reason in ("stop", "length"):
                yield chunk(shape.delta("") if job.kind == "completion" else {"delta": {}}, event.reason)
                if job.include_usage:
                    yield {**chunk({}, None), "choices": [], "usage": usage(event)}
                yield "[DONE]"
            else:
                yield failure(event).body()

    async def list_models(self, request: Request) -> Response:
        tenant = self.authenticate(request, self.bearer(request))
        data = [self.model_card(m) for name, m in self.models.items() if tenant.may_use_model(name)]
        return JSONResponse({"object": "list", "data": data})

    async def get_model(self, request: Request) -> Response:
        tenant = self.authenticate(request, self.bearer(request))
        return JSONResponse(self.model_card(self.model_for(tenant, request.path_params["name"])))

    @staticmethod
    def model_card(model: ServedModel) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": 0, "owned_by": "realm",
                "context_length": model.engine.n_ctx, "chat_template": model.chat.source}

    async def health(self, request: Request) -> Response:
        models = {}
        for name, worker in self.workers.items():
            s = worker.scheduler.stats()
            models[name] = {"executor": worker.model.engine.executor.name, "slots": s.n_slots,
                            "running": s.running, "queued": s.queued, "tokens_generated": s.tokens_generated}
        return JSONResponse({"status": "ok", "models": models})

    async def not_found(self, request: Request) -> Response:
        raise ApiError(404, f"no route {request.method} {request.url.path}")

    async def openapi(self, request: Request) -> Response:
        return JSONResponse(openapi_document())

    # --- WebSocket ---

    async def websocket(self, ws: WebSocket) -> None:
        await ws.accept()
        try:
            tenant = await self.ws_authenticate(ws)
        except ApiError as e:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await ws.send_json({"type": "error", "id": None, "status": e.status, **e.body()})
                await ws.close(code=1008)
            return
        except WebSocketDisconnect:
            return
        outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        active: dict[str, Running] = {}
        writer = asyncio.ensure_future(self.ws_writer(ws, outbox))
        try:
            await ws.send_json({"type": "ready", "tenant": tenant.id,
                                "models": [n for n in self.models if tenant.may_use_model(n)]})
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    await self.ws_message(message, tenant, active, outbox)
                except ApiError as e:
                    outbox.put_nowait(ws_error(e, _message_id(message)))
        except WebSocketDisconnect:
            pass
        finally:
            for running in active.values():
                running.cancel()
            writer.cancel()
            await asyncio.gather(writer, return_exceptions=True)

    async def ws_authenticate(self, ws: WebSocket) -> Tenant:
        key = self.bearer(ws)
        if key is None and not self.tenants.open:
            try:
                message = await asyncio.wait_for(ws.receive(), WS_AUTH_TIMEOUT_S)
            except TimeoutError as e:
                raise ApiError(401, f"no auth message within {WS_AUTH_TIMEOUT_S:.0f} s") from e
            if message["type"] == "websocket.disconnect":
                raise WebSocketDisconnect()
            body = self.ws_json(message)
            if body.get("type") != "auth" or not isinstance(body.get("api_key"), str):
                raise ApiError(401, 'the first message must be {"type": "auth", "api_key": KEY} '
                               "(or send Authorization: Bearer KEY when connecting)")
            key = body["api_key"]
        return self.authenticate(ws, key)

    def ws_json(self, message: dict[str, Any]) -> dict[str, Any]:
        text = message.get("text")
        if text is None:
            raise ApiError(400, "messages must be JSON text, not binary")
        if len(text) > self.settings.max_body_bytes:
            raise ApiError(413, f"message is over the limit of {self.settings.max_body_bytes} bytes")
        return parse_json_object(text)

    async def ws_message(self, message: dict[str, Any], tenant: Tenant, active: dict[str, Running],
                         outbox: asyncio.Queue[dict[str, Any]]) -> None:
        body = self.ws_json(message)
        validate({k: body[k] for k in ("type", "id", "api_key") if k in body}, WS_MESSAGE_SCHEMA, "")
        kind, cid = body["type"], body.get("id")
        if kind == "auth":
            return  # already authenticated; a repeated auth is harmless
        if cid is None:
            raise ApiError(400, "missing required field id", "id")
        if kind == "cancel":
            if cid not in active:
                raise ApiError(404, f"no generation {cid!r} is running on this connection", "id")
            active[cid].cancel()
            return
        if cid in active:
            raise ApiError(400, f"generation {cid!r} is already running on this connection", "id")
        fields = {k: v for k, v in body.items() if k not in ("type", "id")}
        if ("prompt" in fields) == ("messages" in fields):
            raise ApiError(400, "a generate message needs exactly one of prompt and messages", "prompt")
        job = await self.prepare(tenant, fields, "chat" if "messages" in fields else "completion")
        shaper = TextShaper(job.shape.strip_leading_space)

        def on_event(event: Event) -> None:
            if isinstance(event, TokenEvent):
                text = shaper(event.text)
                if text:
                    outbox.put_nowait({"type": "token", "id": cid, "text": text})
                return
            active.pop(cid, None)
            if event.reason in ("stop", "length", "cancelled"):
                outbox.put_nowait({"type": "done", "id": cid, "finish_reason": event.reason, "usage": usage(event)})
            else:
                outbox.put_nowait(ws_error(failure(event), cid))

        active[cid] = self.start(job, tenant, on_event)

    @staticmethod
    async def ws_writer(ws: WebSocket, outbox: asyncio.Queue[dict[str, Any]]) -> None:
        """The one task that sends: generations of one connection interleave whole messages."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            while True:
                await ws.send_json(await outbox.get())


def _default(value: Any, default: Any) -> Any:
    return default if value is None else value


def _message_id(message: dict[str, Any]) -> str | None:
    with contextlib.suppress(ValueError, TypeError, RecursionError):
        body = json.loads(message.get("text") or "null")
        if isinstance(body, dict) and isinstance(body.get("id"), str):
            return body["id"]
    return None


def ws_error(error: ApiError, cid: str | None) -> dict[str, Any]:
    message = {"type": "error", "id": cid, "status": error.status, **error.body()}
    if "Retry-After" in error.headers:
        message["retry_after"] = int(error.headers["Retry-After"])
    return message


def create_app(models: Sequence[ServedModel], tenants: Tenants | None = None,
               settings: ApiSettings = ApiSettings()) -> Starlette:
    """A Starlette app serving only the API (see the module docstring to mount it beside the page)."""
    api = Api(models, tenants, settings)
    app = Starlette(routes=api.routes, lifespan=api.lifespan)
    app.state.api = api
    return app


# --- OpenAPI ---------------------------------------------------------------------------------------

def openapi_document() -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    errors = {str(status): {**error, "description": ERROR_TYPES[status]}
              for status in (400, 401, 403, 404, 413, 429, 503)}
    usage_schema = {"type": "object", "properties": {k: {"type": "integer"} for k in
                                                     ("prompt_tokens", "completion_tokens", "total_tokens")}}

    def generation(summary: str, request_schema: dict[str, Any], choice: dict[str, Any]) -> dict[str, Any]:
        result = {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string"}, "created": {"type": "integer"},
            "model": {"type": "string"}, "usage": usage_schema,
            "choices": {"type": "array", "items": {"type": "object", "properties": {
                "index": {"type": "integer"}, "finish_reason": {"enum": ["stop", "length"]}, **choice}}}}}
        return {"post": {
            "summary": summary, "security": [{"bearer": []}],
            "requestBody": {"required": True, "content": {"application/json": {"schema": request_schema}}},
            "responses": {"200": {"description": "the completion; with \"stream\": true, server-sent events "
                                  "of chunks of the same shape, then `data: [DONE]`",
                                  "content": {"application/json": {"schema": result},
                                              "text/event-stream": {"schema": {"type": "string"}}}},
                          **errors}}}

    model = {"type": "object", "properties": {"id": {"type": "string"}, "object": {"const": "model"},
                                              "context_length": {"type": "integer"},
                                              "chat_template": {"enum": ["gguf", "plain"]}}}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Realm inference API", "version": "1.0.0",
                 "description": "OpenAI-compatible completions over Realm. Streaming tokens over a WebSocket "
                                "is at /ws (protocol in server/api.py). Unknown request fields are ignored."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "properties": {"message": {"type": "string"}, "type": {"type": "string"},
                                                 "param": {"type": ["string", "null"]},
                                                 "code": {"type": ["string", "null"]}}}}}},
        },
        "paths": {
            "/v1/completions": generation("Continue a prompt", COMPLETION_SCHEMA,
                                          {"text": {"type": "string"}}),
            "/v1/chat/completions": generation("Answer a conversation", CHAT_SCHEMA, {"message": {
                "type": "object", "properties": {"role": {"const": "assistant"}, "content": {"type": "string"}}}}),
            "/v1/models": {"get": {"summary": "Models the caller may use", "security": [{"bearer": []}],
                                   "responses": {"200": {"description": "models", "content": {"application/json": {
                                       "schema": {"type": "object", "properties": {
                                           "data": {"type": "array", "items": model}}}}}}, **errors}}},
            "/v1/models/{model}": {"get": {
                "summary": "One model", "security": [{"bearer": []}],
                "parameters": [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the model",
                                      "content": {"application/json": {"schema": model}}}, **errors}}},
            "/health": {"get": {"summary": "Liveness and KV-slot use per model", "responses": {"200": {
                "description": "ok", "content": {"application/json": {"schema": {"type": "object"}}}}}}},
        },
    }


def main() -> None:
    """`python -m server.api`: the API alone (`realm serve` adds the page and the model files)."""
    import uvicorn

    from realm_wasm.cli import resolve_model

    parser = argparse.ArgumentParser(prog="python -m server.api", description="Serve Realm's inference API.")
    parser.add_argument("--model", help="GGUF file (default: the bundled gemma-3-270m Q4_K_M)")
    parser.add_argument("--tenants", type=Path, help="tenants TOML file (default: open, loopback only)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--slots", type=int, default=8, help="KV-cache slots: sequences decoded together")
    parser.add_argument("--ctx", type=int, default=2048, help="context length (tokens) of each slot")
    parser.add_argument("--backend", default="auto", help="cpu (numpy), wgpu, or auto: wgpu when an adapter exists")
    args = parser.parse_args()
    try:
        tenants = load_tenants(args.tenants) if args.tenants else Tenants.open_access()
        check_bind_host(args.host, tenants)
        model = load_model(resolve_model(args.model), backend=args.backend, n_ctx=args.ctx, n_slots=args.slots)
    except (OSError, ValueError) as e:
        raise SystemExit(f"realm: error: {e}") from e
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    uvicorn.run(create_app([model], tenants), host=args.host, port=args.port, access_log=False)


if __name__ == "__main__":
    main()
