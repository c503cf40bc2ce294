"""The API over a WebSocket at /ws: token streaming with cancel, several generations per connection.

Protocol (JSON text messages):
    client -> {"type": "auth", "api_key": KEY}        first, unless an Authorization header was sent
    server -> {"type": "ready", "tenant": ID, "models": [NAME, ...]}
    client -> {"type": "generate", "id": ID, "model": ..., "prompt": ... | "messages": [...],
               "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "lora", "speculation"}
                                                                                (as over HTTP;
               "n" > 1, "logprobs" and "tools" are HTTP only: a 400 here)
    server -> {"type": "token", "id": ID, "text": "..."}                        (many)
    server -> {"type": "done", "id": ID, "finish_reason": "stop"|"length"|"cancelled", "usage": {...},
               "lora": [{"id", "scale"}, ...]}  (the adapters applied, when any; "lora" asks for them as over HTTP)
    client -> {"type": "cancel", "id": ID}
    server -> {"type": "error", "id": ID | null, "status": 4xx, "error": {...}, "retry_after": s?}
Ids are the client's own and live per connection: one connection cannot see or cancel another's.
A bad message (not JSON, binary, a lone surrogate escape, a wrong field) gets an error and the
connection stays open; a failed auth closes it (code 1008), a server fault that leaves it unusable
with 1011, each with a reason; uvicorn closes a text frame that is not UTF-8 (1007) or one over its
size limit (1009). Closing the connection cancels its generations.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from realm_wasm.errors import RealmError

from .errors import ApiError, api_error
from .http import bearer, caller
from .schema import WS_MESSAGE_SCHEMA, is_unicode, parse_json_object, validate
from .service import Generation, Service, read_chunk
from .tenants import Tenant

log = logging.getLogger("realm.server")

WS_AUTH_TIMEOUT_S = 10.0


def ws_error(error: ApiError, cid: str | None) -> dict[str, Any]:
    message = {"type": "error", "id": cid, "status": error.status, **error.body()}
    if "Retry-After" in error.headers:
        message["retry_after"] = int(error.headers["Retry-After"])
    return message


def _message_id(message: dict[str, Any]) -> str | None:
    """The id a message names, if it is JSON with a valid one: its error goes to that generation."""
    with contextlib.suppress(ValueError, TypeError, RecursionError):
        body = json.loads(message.get("text") or "null")
        cid = body.get("id") if isinstance(body, dict) else None
        if isinstance(cid, str) and is_unicode(cid) and len(cid) <= WS_MESSAGE_SCHEMA["properties"]["id"]["maxLength"]:
            return cid
    return None


class Connection:
    """One authenticated client: its generations by the client's ids, and one outbox that a single
    writer task sends from, so the generations of a connection interleave whole messages."""

    def __init__(self, service: Service, ws: WebSocket, tenant: Tenant) -> None:
        self.service, self.ws, self.tenant = service, ws, tenant
        self.outbox: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.active: dict[str, Generation] = {}
        self.streams: set[asyncio.Task] = set()

    async def serve(self) -> None:
        writer = asyncio.ensure_future(self.write())
        try:
            await self.ws.send_json({"type": "ready", "tenant": self.tenant.id,
                                     "models": self.service.model_names(self.tenant)})
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                try:
                    await self.handle(message)
                except ApiError as e:
                    self.outbox.put_nowait(ws_error(e, _message_id(message)))
                except RealmError as e:
                    self.outbox.put_nowait(ws_error(api_error(e), _message_id(message)))
                except Exception:  # a bug, not the message: say so, and keep serving the connection
                    log.exception("WebSocket message failed")
                    self.outbox.put_nowait(ws_error(ApiError(500, "internal error"), _message_id(message)))
        except WebSocketDisconnect:
            pass
        finally:
            for generation in self.active.values():
                generation.cancel()
            for task in (*self.streams, writer):
                task.cancel()
            await asyncio.gather(*self.streams, writer, return_exceptions=True)

    def running(self, cid: str) -> Generation | None:
        generation = self.active.get(cid)
        return generation if generation is not None and not generation.finished else None

    async def handle(self, message: dict[str, Any]) -> None:
        body = ws_json(message, self.service.settings.max_body_bytes)
        validate({k: body[k] for k in ("type", "id", "api_key") if k in body}, WS_MESSAGE_SCHEMA, "")
        kind, cid = body["type"], body.get("id")
        if kind == "auth":
            return  # already authenticated; a repeated auth is harmless
        if cid is None:
            raise ApiError(400, "missing required field id", "id")
        if kind == "cancel":
            generation = self.running(cid)
            if generation is None:
                raise ApiError(404, f"no generation {cid!r} is running on this connection", "id")
            generation.cancel()
            return
        if self.running(cid) is not None:
            raise ApiError(400, f"generation {cid!r} is already running on this connection", "id")
        fields = {k: v for k, v in body.items() if k not in ("type", "id", "api_key")}
        for name, plain in (("n", 1), ("logprobs", False), ("top_logprobs", None), ("tools", None)):  # text only
            value = fields.get(name)
            if value is not None and not (value == plain and type(value) is type(plain)):
                raise ApiError(400, f"{name} is not supported over the WebSocket (use HTTP)", name)
        if ("prompt" in fields) == ("messages" in fields):
            raise ApiError(400, "a generate message needs exactly one of prompt and messages", "prompt")
        job = await self.service.prepare(self.tenant, fields, "chat" if "messages" in fields else "completion")
        generation = self.service.start(job, self.tenant)
        self.active[cid] = generation
        task = asyncio.ensure_future(self.stream(cid, generation))
        self.streams.add(task)
        task.add_done_callback(self.streams.discard)

    async def stream(self, cid: str, generation: Generation) -> None:
        """One generation's chunks as token messages, then its done (or error) message."""
        finish_reason, used = None, None
        try:
            async for chunk in generation.chunks(include_usage=True):
                text, reason, chunk_usage = read_chunk(generation.job.shape, chunk)
                if text:
                    self.outbox.put_nowait({"type": "token", "id": cid, "text": text})
                finish_reason, used = reason or finish_reason, chunk_usage or used
            last = {"type": "done", "id": cid, "finish_reason": finish_reason, "usage": used,
                    **generation.job.applied()}
        except ApiError as e:
            last = ws_error(e, cid)
        except Exception:
            log.exception("WebSocket generation %s failed", cid)
            last = ws_error(ApiError(500, "internal error"), cid)
        if self.active.get(cid) is generation:
            del self.active[cid]
        self.outbox.put_nowait(last)

    async def write(self) -> None:
        """Send the outbox in order; a message that cannot be sent ends the connection with 1011 and
        a reason, never in silence (the client would wait forever)."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            while True:
                message = await self.outbox.get()
                try:
                    await self.ws.send_json(message)
                except (TypeError, ValueError):  # not JSON, or not encodable: a bug on our side
                    log.exception("WebSocket message %s could not be sent", message.get("type"))
                    await self.ws.close(code=1011, reason="internal error: a message could not be sent")
                    return


def close_reason(text: str) -> str:
    """A close frame's reason: at most 123 bytes of UTF-8 (RFC 6455)."""
    return text.encode()[:123].decode(errors="ignore")


def ws_json(message: dict[str, Any], limit: int) -> dict[str, Any]:
    text = message.get("text")
    if text is None:
        raise ApiError(400, "messages must be JSON text, not binary")
    if len(text) > limit:
        raise ApiError(413, f"message is over the limit of {limit} bytes")
    return parse_json_object(text)


async def authenticate(service: Service, ws: WebSocket) -> Tenant:
    """The tenant of the handshake's Authorization header, else of the first message (browsers
    cannot set headers on a WebSocket)."""
    key = bearer(ws)
    if key is None and not service.tenants.open:
        try:
            message = await asyncio.wait_for(ws.receive(), WS_AUTH_TIMEOUT_S)
        except TimeoutError as e:
            raise ApiError(401, f"no auth message within {WS_AUTH_TIMEOUT_S:.0f} s") from e
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect()
        body = ws_json(message, service.settings.max_body_bytes)
        if body.get("type") != "auth" or not isinstance(body.get("api_key"), str):
            raise ApiError(401, 'the first message must be {"type": "auth", "api_key": KEY} '
                           "(or send Authorization: Bearer KEY when connecting)")
        key = body["api_key"]
    return caller(service, ws, key)


def websocket_route(service: Service) -> WebSocketRoute:
    async def websocket(ws: WebSocket) -> None:
        await ws.accept()
        try:
            tenant = await authenticate(service, ws)
        except ApiError as e:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError):
                await ws.send_json({"type": "error", "id": None, "status": e.status, **e.body()})
                await ws.close(code=1008, reason=close_reason(e.message))
            return
        except WebSocketDisconnect:
            return
        await Connection(service, ws, tenant).serve()

    return WebSocketRoute("/ws", websocket)
