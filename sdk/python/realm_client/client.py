"""HTTP clients for Realm's OpenAI-compatible API: `RealmClient` (sync) and `AsyncRealmClient`.

    client = RealmClient("http://127.0.0.1:8000", api_key="...")
    print(client.complete("The capital of France is", max_tokens=8, temperature=0).text)
    with client.stream("Once upon a time", max_tokens=40) as stream:
        for chunk in stream:
            print(chunk.text, end="", flush=True)

    vectors = client.embeddings(["first text", "second text"])
    ids = client.tokenize("Hello"); text = client.detokenize(ids)

`model` may be left out: the first model the server lists is used. Sampling parameters left as
None take the server's defaults. Leaving a stream early (break, close, exception) closes the
connection, which cancels the generation on the server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator, Sequence
from types import TracebackType
from typing import Any, Unpack

import httpx

from .errors import APIConnectionError, error_from
from .types import (
    Chunk,
    Completion,
    GenerationParams,
    Message,
    ModelInfo,
    SSEDecoder,
    Usage,
    generation_body,
    parse_completion,
    parse_models,
)
from .ws import AsyncWebSocketSession, WebSocketSession, ws_url

DEFAULT_URL = "http://127.0.0.1:8000"
PATHS = {"prompt": "/v1/completions", "messages": "/v1/chat/completions"}


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


def _error(response: httpx.Response) -> Exception:
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return error_from(response.status_code, body, response.headers.get("retry-after"))


class _SSEStream:
    """A streamed response being decoded; `finish_reason` and `usage` are set once read to its end."""

    def __init__(self, response: httpx.Response, exit_stack: Any) -> None:
        self._response, self._exit = response, exit_stack
        self._decoder = SSEDecoder()

    @property
    def finish_reason(self) -> str | None:
        return self._decoder.finish_reason

    @property
    def usage(self) -> Usage | None:
        return self._decoder.usage


class Stream(_SSEStream):
    """Iterate for Chunks."""

    def __iter__(self) -> Iterator[Chunk]:
        try:
            for line in self._response.iter_lines():
                chunk = self._decoder.line(line)
                if chunk is not None:
                    yield chunk
            self._decoder.line("")
            self._decoder.check_complete()
        except httpx.HTTPError as e:
            raise APIConnectionError(f"stream broke: {e}") from e
        finally:
            self.close()

    def text(self) -> str:
        """Read the whole stream and return its text."""
        return "".join(chunk.text for chunk in self)

    def close(self) -> None:
        self._exit(None, None, None)

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RealmClient:
    """Synchronous client. Use as a context manager, or call `close()`."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.base_url, self.api_key = base_url.rstrip("/"), api_key
        self._http = httpx.Client(base_url=self.base_url, headers=_headers(api_key), timeout=timeout)
        self._default_model: str | None = None

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise APIConnectionError(f"{method} {path}: {e}") from e
        if response.status_code != 200:
            raise _error(response)
        return response.json()

    def health(self) -> dict[str, Any]:
        return self._request("GET", "/health")

    def models(self) -> list[ModelInfo]:
        return parse_models(self._request("GET", "/v1/models"))

    def default_model(self) -> str:
        if self._default_model is None:
            models = self.models()
            if not models:
                raise APIConnectionError("the server lists no model this key may use")
            self._default_model = models[0].id
        return self._default_model

    def _body(self, model: str | None, prompt: Any, messages: Any, params: GenerationParams, stream: bool) -> dict:
        return generation_body(model or self.default_model(), prompt, messages, params, stream)

    def complete(self, prompt: str | list[int], *, model: str | None = None,
                 **params: Unpack[GenerationParams]) -> Completion:
        body = self._body(model, prompt, None, params, False)
        return parse_completion(self._request("POST", PATHS["prompt"], body))

    def chat(self, messages: Sequence[Message], *, model: str | None = None,
             **params: Unpack[GenerationParams]) -> Completion:
        body = self._body(model, None, messages, params, False)
        return parse_completion(self._request("POST", PATHS["messages"], body))

    def stream(self, prompt: str | list[int], *, model: str | None = None,
               **params: Unpack[GenerationParams]) -> Stream:
        return self._stream(PATHS["prompt"], self._body(model, prompt, None, params, True))

    def chat_stream(self, messages: Sequence[Message], *, model: str | None = None,
                    **params: Unpack[GenerationParams]) -> Stream:
        return self._stream(PATHS["messages"], self._body(model, None, messages, params, True))

    def _stream(self, path: str, body: dict[str, Any]) -> Stream:
        context = self._http.stream("POST", path, json=body)
        try:
            response = context.__enter__()
        except httpx.HTTPError as e:
            raise APIConnectionError(f"POST {path}: {e}") from e
        if response.status_code != 200:
            response.read()
            context.__exit__(None, None, None)
            raise _error(response)
        return Stream(response, context.__exit__)

    def embeddings(self, input: str | Sequence[str], *, model: str | None = None) -> list[list[float]]:
        """One L2-normalized embedding per text (a single text: a list of one)."""
        body = self._request("POST", "/v1/embeddings", {"model": model or self.default_model(), "input": input})
        return [item["embedding"] for item in sorted(body["data"], key=lambda item: item["index"])]

    def tokenize(self, content: str, *, model: str | None = None, add_special: bool = False) -> list[int]:
        """Token ids of a text (`add_special`: with BOS, as a prompt)."""
        return self._request("POST", "/tokenize", {"model": model or self.default_model(), "content": content,
                                                   "add_special": add_special})["tokens"]

    def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        return self._request("POST", "/detokenize", {"model": model or self.default_model(),
                                                     "tokens": list(tokens)})["content"]

    def websocket(self, open_timeout: float = 30.0) -> WebSocketSession:
        """A WebSocket session (a context manager) for token streams with cancel."""
        return WebSocketSession(ws_url(self.base_url), self.api_key, open_timeout)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> RealmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncStream(_SSEStream):
    """`async for` over Chunks."""

    async def __aiter__(self) -> AsyncIterator[Chunk]:
        try:
            async for line in self._response.aiter_lines():
                chunk = self._decoder.line(line)
                if chunk is not None:
                    yield chunk
            self._decoder.line("")
            self._decoder.check_complete()
        except httpx.HTTPError as e:
            raise APIConnectionError(f"stream broke: {e}") from e
        finally:
            await self.aclose()

    async def text(self) -> str:
        return "".join([chunk.text async for chunk in self])

    async def aclose(self) -> None:
        await self._exit(None, None, None)

    async def __aenter__(self) -> AsyncStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()


class AsyncRealmClient:
    """The same API as RealmClient, for asyncio: awaitables, and `async for` over streams."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 300.0) -> None:
        self.base_url, self.api_key = base_url.rstrip("/"), api_key
        self._http = httpx.AsyncClient(base_url=self.base_url, headers=_headers(api_key), timeout=timeout)
        self._default_model: str | None = None

    async def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = await self._http.request(method, path, json=body)
        except httpx.HTTPError as e:
            raise APIConnectionError(f"{method} {path}: {e}") from e
        if response.status_code != 200:
            raise _error(response)
        return response.json()

    async def health(self) -> dict[str, Any]:
        return await self._request("GET", "/health")

    async def models(self) -> list[ModelInfo]:
        return parse_models(await self._request("GET", "/v1/models"))

    async def default_model(self) -> str:
        if self._default_model is None:
            models = await self.models()
            if not models:
                raise APIConnectionError("the server lists no model this key may use")
            self._default_model = models[0].id
        return self._default_model

    async def _body(self, model: str | None, prompt: Any, messages: Any, params: GenerationParams,
                    stream: bool) -> dict:
        return generation_body(model or await self.default_model(), prompt, messages, params, stream)

    async def complete(self, prompt: str | list[int], *, model: str | None = None,
                       **params: Unpack[GenerationParams]) -> Completion:
        body = await self._body(model, prompt, None, params, False)
        return parse_completion(await self._request("POST", PATHS["prompt"], body))

    async def chat(self, messages: Sequence[Message], *, model: str | None = None,
                   **params: Unpack[GenerationParams]) -> Completion:
        body = await self._body(model, None, messages, params, False)
        return parse_completion(await self._request("POST", PATHS["messages"], body))

    async def stream(self, prompt: str | list[int], *, model: str | None = None,
                     **params: Unpack[GenerationParams]) -> AsyncStream:
        return await self._stream(PATHS["prompt"], await self._body(model, prompt, None, params, True))

    async def chat_stream(self, messages: Sequence[Message], *, model: str | None = None,
                          **params: Unpack[GenerationParams]) -> AsyncStream:
        return await self._stream(PATHS["messages"], await self._body(model, None, messages, params, True))

    async def _stream(self, path: str, body: dict[str, Any]) -> AsyncStream:
        context = self._http.stream("POST", path, json=body)
        try:
            response = await context.__aenter__()
        except httpx.HTTPError as e:
            raise APIConnectionError(f"POST {path}: {e}") from e
        if response.status_code != 200:
            await response.aread()
            await context.__aexit__(None, None, None)
            raise _error(response)
        return AsyncStream(response, context.__aexit__)

    async def embeddings(self, input: str | Sequence[str], *, model: str | None = None) -> list[list[float]]:
        body = await self._request("POST", "/v1/embeddings", {"model": model or await self.default_model(),
                                                              "input": input})
        return [item["embedding"] for item in sorted(body["data"], key=lambda item: item["index"])]

    async def tokenize(self, content: str, *, model: str | None = None, add_special: bool = False) -> list[int]:
        return (await self._request("POST", "/tokenize", {"model": model or await self.default_model(),
                                                          "content": content, "add_special": add_special}))["tokens"]

    async def detokenize(self, tokens: Sequence[int], *, model: str | None = None) -> str:
        return (await self._request("POST", "/detokenize", {"model": model or await self.default_model(),
                                                            "tokens": list(tokens)}))["content"]

    def websocket(self, open_timeout: float = 30.0) -> AsyncWebSocketSession:
        """`async with client.websocket() as ws:` a WebSocket session for token streams with cancel."""
        return AsyncWebSocketSession(ws_url(self.base_url), self.api_key, open_timeout)

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncRealmClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
