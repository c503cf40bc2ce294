"""WebSocket sessions: many token streams over one connection, each cancellable.

    with client.websocket() as ws:
        gen = ws.generate(prompt="Once upon a time", max_tokens=40)
        for chunk in gen:
            print(chunk.text, end="")
            if "dragon" in chunk.text:
                gen.cancel()          # the stream then ends with finish_reason "cancelled"

Generations of one session may be read in any order: messages for one are kept until it is read.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import ExitStack
from typing import Any, Unpack

from websockets.asyncio.client import connect as async_connect
from websockets.exceptions import WebSocketException
from websockets.sync.client import connect

from .errors import APIConnectionError, RealmError, error_from
from .types import Chunk, GenerationParams, Message, Usage, ws_chunk, ws_generate_message


def ws_url(base_url: str) -> str:
    """http(s)://host -> ws(s)://host/ws"""
    scheme, rest = base_url.split("://", 1)
    return f"{'wss' if scheme == 'https' else 'ws'}://{rest}/ws"


def _ready(message: dict[str, Any]) -> list[str]:
    """The models a `ready` message lists, or the typed error the server sent instead."""
    if message.get("type") != "ready":
        raise error_from(message.get("status", 500), message)
    return list(message["models"])


def _new_id() -> str:
    return uuid.uuid4().hex[:12]


class Generation:
    """One generation's Chunks (iterate); `cancel()` stops it. `usage` is set once it is done."""

    def __init__(self, session: WebSocketSession, gen_id: str) -> None:
        self.session, self.id = session, gen_id
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def __iter__(self) -> Iterator[Chunk]:
        while self.finish_reason is None:
            chunk, self.usage = ws_chunk(self.session._next(self.id))
            if chunk.finish_reason is not None:
                self.finish_reason = chunk.finish_reason
            yield chunk

    def text(self) -> str:
        return "".join(chunk.text for chunk in self)

    def cancel(self) -> None:
        self.session._send({"type": "cancel", "id": self.id})


class WebSocketSession:
    """A connection to /ws (a context manager). Authenticates with the API key when it opens."""

    def __init__(self, url: str, api_key: str | None, open_timeout: float = 30.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
        self._exit = ExitStack()
        try:
            self._ws = self._exit.enter_context(connect(url, additional_headers=headers, open_timeout=open_timeout,
                                                        max_size=None))
        except (OSError, WebSocketException) as e:
            raise APIConnectionError(f"cannot open {url}: {e}") from e
        self._pending: dict[str, deque[dict[str, Any]]] = {}
        try:
            self.models = _ready(self._receive())
        except RealmError:
            self.close()
            raise

    def _receive(self) -> dict[str, Any]:
        try:
            return json.loads(self._ws.recv())
        except (OSError, WebSocketException) as e:
            raise APIConnectionError(f"WebSocket closed: {e}") from e

    def _send(self, message: dict[str, Any]) -> None:
        try:
            self._ws.send(json.dumps(message))
        except (OSError, WebSocketException) as e:
            raise APIConnectionError(f"WebSocket closed: {e}") from e

    def _next(self, gen_id: str) -> dict[str, Any]:
        """The next message for one generation, keeping others' messages for their own readers."""
        queue = self._pending.setdefault(gen_id, deque())
        while not queue:
            message = self._receive()
            target = message.get("id")
            if target is None:  # an error about no generation in particular
                raise error_from(message.get("status", 500), message)
            self._pending.setdefault(target, deque()).append(message)
        message = queue.popleft()
        if message.get("type") != "token":
            del self._pending[gen_id]
        return message

    def generate(self, prompt: str | list[int] | None = None, *, messages: Sequence[Message] | None = None,
                 model: str | None = None, **params: Unpack[GenerationParams]) -> Generation:
        """Start a generation from a prompt or chat messages (the first listed model unless `model`)."""
        if not self.models and model is None:
            raise RealmError("the server lists no model this key may use")
        gen_id = _new_id()
        self._send(ws_generate_message(gen_id, model or self.models[0], prompt, messages, params))
        return Generation(self, gen_id)

    def close(self) -> None:
        self._exit.close()

    def __enter__(self) -> WebSocketSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncGeneration:
    """`async for` over one generation's Chunks; `await cancel()` stops it."""

    def __init__(self, session: AsyncWebSocketSession, gen_id: str,
                 queue: asyncio.Queue[dict[str, Any] | None]) -> None:
        self.session, self.id, self._queue = session, gen_id, queue
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        while self.finish_reason is None:
            message = await self._queue.get()
            if message is None:
                raise APIConnectionError("WebSocket closed")
            chunk, self.usage = ws_chunk(message)
            if chunk.finish_reason is not None:
                self.finish_reason = chunk.finish_reason
            yield chunk

    async def text(self) -> str:
        return "".join([chunk.text async for chunk in self])

    async def cancel(self) -> None:
        await self.session._send({"type": "cancel", "id": self.id})


class AsyncWebSocketSession:
    """`async with client.websocket() as ws:`; one reader task routes messages to their generations."""

    def __init__(self, url: str, api_key: str | None, open_timeout: float = 30.0) -> None:
        self.url, self.api_key, self.open_timeout = url, api_key, open_timeout
        self.models: list[str] = []
        self._queues: dict[str, asyncio.Queue[dict[str, Any] | None]] = {}  # None: the connection closed

    async def __aenter__(self) -> AsyncWebSocketSession:
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else None
        try:
            self._ws = await async_connect(self.url, additional_headers=headers, open_timeout=self.open_timeout,
                                           max_size=None)
            self.models = _ready(json.loads(await self._ws.recv()))
        except (OSError, WebSocketException) as e:
            raise APIConnectionError(f"cannot open {self.url}: {e}") from e
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def _read(self) -> None:
        try:
            async for raw in self._ws:
                message = json.loads(raw)
                target = message.get("id")
                queues = [self._queues[target]] if target in self._queues else list(self._queues.values())
                for queue in queues:  # an error about no generation in particular reaches every reader
                    queue.put_nowait(message)
        except (OSError, WebSocketException):
            pass
        for queue in self._queues.values():
            queue.put_nowait(None)

    async def _send(self, message: dict[str, Any]) -> None:
        try:
            await self._ws.send(json.dumps(message))
        except (OSError, WebSocketException) as e:
            raise APIConnectionError(f"WebSocket closed: {e}") from e

    async def generate(self, prompt: str | list[int] | None = None, *, messages: Sequence[Message] | None = None,
                       model: str | None = None, **params: Unpack[GenerationParams]) -> AsyncGeneration:
        if not self.models and model is None:
            raise RealmError("the server lists no model this key may use")
        gen_id = _new_id()
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self._queues[gen_id] = queue
        await self._send(ws_generate_message(gen_id, model or self.models[0], prompt, messages, params))
        return AsyncGeneration(self, gen_id, queue)

    async def aclose(self) -> None:
        await self._ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
